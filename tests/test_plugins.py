"""Parts added from outside the package: tests/plugin/ is a user's package with one part of every kind,
each in one file, registered with entry points (its pyproject.toml) as docs/extending.md says. It is
installed here the way pip records an installed package's entry points (a .dist-info folder on the
path) and trains, stops, resumes and is reported with its parts, in a fresh interpreter."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from powergrad_train.config import registry, schema

PLUGIN = Path(__file__).resolve().parent / "plugin"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def install(site: Path, entry_points: dict[str, dict[str, str]], name: str = "example-parts") -> list[str]:
    """The package's metadata as pip writes it for an installed package; the path entries that make
    it importable (its metadata, then its source)."""
    dist = site / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
        for group, points in entry_points.items()))
    return [str(site), str(PLUGIN)]


def example_entry_points() -> dict[str, dict[str, str]]:
    return tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]["entry-points"]


def test_the_example_package_adds_one_part_of_every_kind_each_in_one_file():
    """What the docs' extension guide promises, checked against the example: every kind has its entry-point
    group, and each part the package adds is one file of it."""
    groups = example_entry_points()
    assert set(groups) == {registry.ENTRY_POINT_GROUP.format(kind=kind) for kind in registry.KINDS}
    for points in groups.values():
        (value,) = points.values()
        module = value.split(":")[0]
        assert (PLUGIN / (module.replace(".", "/") + ".py")).is_file(), value
    guide = (DOCS / "extending.md").read_text()
    for kind in registry.KINDS:
        assert f'"{registry.ENTRY_POINT_GROUP.format(kind=kind)}"' in guide, kind


DRIVER = """
import os, sys
sys.path[:0] = {paths!r}
from powergrad_train.cli import main
from powergrad_train.config.schema import describe_keys

def run(*args):
    try:
        main(list(args))
    except SystemExit as e:
        return e.code
    return 0

common = ["--config", "smoke.yaml", *{overrides!r}]
print("help", all(k in describe_keys() for k in ("data.bands_images", "loss.temperature", "optim.rms_alpha",
      "schedule.gamma", "batch_transform.flip_prob", "log.lines_file")), flush=True)
print("exit A", run(*common, "--output", "A"), flush=True)
os.environ["EXAMPLE_PARTS_STOP_AFTER_EPOCH"] = "1"
print("exit B", run(*common, "--output", "B"), flush=True)
del os.environ["EXAMPLE_PARTS_STOP_AFTER_EPOCH"]
print("exit B resumed", run(*common, "--output", "B", "--resume", "auto"), flush=True)
print("exit report", run("report", "A", "B", "--out", "report"), flush=True)
"""

OVERRIDES = {
    "data.backend": "bands", "loss.name": "tempered_ce", "loss.temperature": 2.0, "batch_transform.name": "flip_half",
    "optim.name": "rmsprop", "optim.lr": 0.002, "optim.weight_decay": 0, "schedule.name": "exponential",
    "schedule.gamma": 0.7, "weight_average.name": "mean", "log.outputs": "[console,csv,lines]",
    "model.num_classes": 4, "data.image_size": 16, "data.batch_size": 16, "data.bands_images": 96,
    "data.workers": 0, "schedule.epochs": 3, "schedule.warmup_epochs": 0.5, "schedule.cooldown_epochs": 0,
    "train.log_every_steps": 2, "checkpoint.keep_last": 0,  # (a checkpoint here holds three models' worth)
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run A uninterrupted; run B stopped by SIGTERM after its first epoch, then resumed; both reported."""
    work = tmp_path_factory.mktemp("plugin-runs")
    paths = install(work / "site", example_entry_points())
    code = DRIVER.format(paths=paths, overrides=[f"--set={k}={v}" for k, v in OVERRIDES.items()])
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    return work, done


def test_a_run_of_outside_parts_trains_resumes_exactly_and_is_reported(trained):
    work, done = trained
    lines = done.stdout.splitlines()
    assert "help True" in lines, done.stdout + done.stderr  # --help lists every part's keys
    assert "exit A 0" in lines and "exit B 143" in lines and "exit B resumed 0" in lines, done.stdout + done.stderr
    assert "exit report 0" in lines, done.stdout + done.stderr
    a, b = (torch.load(work / run / "last.pt", weights_only=False) for run in ("A", "B"))
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 3
    for name, tensor in a["model"].items():  # the resumed run ends where the uninterrupted one does
        assert torch.equal(tensor, b["model"][name]), name
    # The objective's and the weight average's states are checkpoint parts, continued across the stop.
    assert a["objective"] == b["objective"] and a["objective"]["calls"] == 3 * (96 // 16)
    assert a["mean"]["count"] == 3 * (96 // 16)
    for name, tensor in a["mean"]["model"].items():
        assert torch.equal(tensor, b["mean"]["model"][name]), name
    # The optimizer is RMSprop (its state holds square_avg) and the LR followed the plugin's schedule.
    assert all("square_avg" in s for s in a["optimizer"]["state"].values())
    with open(work / "B" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[2]["lr"]) < float(rows[1]["lr"]) < float(rows[0]["lr"])
    assert all(r["eval_mean_top1"] for r in rows)  # the weight average's own column
    assert float(rows[-1]["eval_top1"]) > 25.0  # above chance (4 classes): it learned the bands
    # The output wrote one line per epoch, the epoch after the stop once.
    assert [line.split()[1] for line in (work / "B" / "lines.txt").read_text().splitlines()] == ["1", "2", "3"]
    report = (work / "report" / "report.md").read_text()
    assert "A" in report and "B" in report


@pytest.fixture
def fresh_registry(monkeypatch):
    """Entry points and the schema read again now, and again after the test (they are read once per process)."""
    def clear():
        registry._plugins.cache_clear()
        registry.load.cache_clear()
        schema.assembled.cache_clear()
    clear()
    yield monkeypatch
    monkeypatch.undo()
    clear()


def test_an_installed_part_is_named_and_checked_like_a_built_in_one(tmp_path, fresh_registry):
    from powergrad_train.config.build import build_config
    for path in install(tmp_path, example_entry_points()):
        fresh_registry.syspath_prepend(path)
    assert "rmsprop" in registry.names("optimizer")
    cfg = build_config(None, ["optim.name=rmsprop", "optim.rms_alpha=0.9"])
    assert (cfg.optim.name, cfg.optim.rms_alpha) == ("rmsprop", 0.9)
    assert schema.keys()["optim.rms_alpha"].meta["help"].startswith("rmsprop: ")
    with pytest.raises(Exception, match=r"--set optim.lr=0.9: optim.name = rmsprop diverges above optim.lr 0.5"):
        build_config(None, ["optim.name=rmsprop", "optim.lr=0.9"])
    with pytest.raises(Exception, match=r"optim.rms_alpha = 1.5 is out of range"):
        build_config(None, ["optim.name=rmsprop", "optim.rms_alpha=1.5"])


@pytest.mark.parametrize("points, message", [
    ({"powergrad_train.optimizer": {"sgd": "example_parts.rmsprop:PART"}},
     r"package example-parts \(entry point sgd = example_parts.rmsprop:PART\) registers optimizer 'sgd', "
     r"which is built in"),
    ({"powergrad_train.optimizer": {"broken": "example_parts.no_such_module:PART"}},
     r"entry point broken = example_parts.no_such_module:PART\): cannot load it \(ModuleNotFoundError"),
    ({"powergrad_train.optimizer": {"odd": "example_parts.rmsprop:rmsprop"}},
     r"entry point odd = example_parts.rmsprop:rmsprop\): names a function, not a "
     r"powergrad_train.config.declare.Part"),
])
def test_a_faulty_package_is_one_line_naming_it(tmp_path, fresh_registry, points, message):
    """A package whose entry point clashes with a built-in part, does not import or names something else
    is told in one line naming the package and its entry point, at the first config read."""
    from powergrad_train.config.build import build_config
    from powergrad_train.system.errors import UserError
    for path in install(tmp_path, points, name="example-parts"):
        fresh_registry.syspath_prepend(path)
    with pytest.raises(UserError, match=message) as raised:
        build_config(None, [])
    assert "\n" not in str(raised.value)


def test_a_part_whose_key_another_part_declares_differently_is_refused(tmp_path, fresh_registry):
    """Two parts may read one key only by declaring the same dataclass (as adamw and lamb do)."""
    from powergrad_train.config.build import build_config
    from powergrad_train.system.errors import UserError
    source = tmp_path / "src" / "clash.py"
    source.parent.mkdir()
    source.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from powergrad_train.config.declare import Part, opt

        @dataclass
        class Keys:
            momentum: float = opt(0.5, "another momentum")

        PART = Part(lambda cfg, groups: None, "clashes with sgd", keys=Keys)
    """))
    site = tmp_path / "site"
    install(site, {"powergrad_train.optimizer": {"clash": "clash:PART"}}, name="clash")
    fresh_registry.syspath_prepend(str(site))
    fresh_registry.syspath_prepend(str(source.parent))
    with pytest.raises(UserError, match=r"optimizer 'clash' declares optim.momentum, which another part declares too"):
        build_config(None, [])
