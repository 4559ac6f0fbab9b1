"""log.outputs: [wandb] and [mlflow] against the real libraries, never the network: W&B writes its
offline run into the run folder, MLflow a file store there. One tiny run trains 2 epochs with
both, and a copy of its folder cut back to epoch 1 resumes: the same tracker runs continue."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from powergrad_train.cli import main
from powergrad_train.training import checkpoint
from tests.conftest import tiny_overrides


def offline(mp: pytest.MonkeyPatch, home: Path) -> None:
    """No W&B or MLflow setting of the user's (no API key, no tracking server); every file the two
    libraries write outside the run folder (W&B's settings, cache, service) goes under `home`."""
    for name in [n for n in os.environ if n.startswith(("WANDB_", "MLFLOW_"))]:
        mp.delenv(name)
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        mp.setenv(name, str(home))
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(name, str(home / name.lower()))
    mp.setenv("WANDB_SILENT", "true")


def wandb_runs(run_dir: Path) -> dict[str, dict]:
    """Each offline W&B run folder under run_dir/wandb: its run id, config and history {step: values},
    read from its .wandb file (a log of protobuf records in LevelDB's block format). W&B's service process
    writes that file: it is stopped first, which waits until the file is complete (run.finish() can
    return before the service has written the last records)."""
    if sys.modules.get("wandb") is not None:
        sys.modules["wandb"].teardown()
    found = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"id": None, "config": {}, "history": {}}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                run["config"] |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "config":
                run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
            elif kind == "history":
                values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["history"].setdefault(values["_step"], {}).update(values)
        found[path.parent.name] = run
    return found


def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2
    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pieces = 7, b""  # after the file header: ident, magic, version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a record header never straddles a block: the rest is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])  # crc, length, full/first/middle/last
        if kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def mlflow_client(run_dir: Path):
    from powergrad_train.training.outputs_mlflow import _client
    return _client(f"file:{run_dir.resolve()}/mlruns")


def summary(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tracked(tiny_root, module_tmp):
    """(run folder trained 2 epochs, its copy cut back to epoch 1 and resumed to 2), with
    log.outputs [csv, wandb, mlflow] and the trackers offline."""
    import wandb
    run_dir, resumed = module_tmp / "run", module_tmp / "resumed"
    overrides = [*tiny_overrides(tiny_root, **{"data.batch_size": 32, "train.log_every_steps": 2}),
                 "--set=log.outputs=[csv,wandb,mlflow]"]  # 5 steps per epoch
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, module_tmp / "home")
        try:
            main(["--config", "smoke.yaml", "--output", str(run_dir), *overrides])
            shutil.copytree(run_dir, resumed, symlinks=True)
            for name in ("epoch-0002.pt", "last.pt", "best.pt"):
                (resumed / name).unlink(missing_ok=True)
            main(["--config", "smoke.yaml", "--output", str(resumed), "--resume", "auto", *overrides])
        finally:
            wandb.teardown()  # its service process, started with this test's environment
    return run_dir, resumed


def test_wandb_holds_the_config_and_the_epoch_rows_of_summary_csv(tracked):
    run_dir, _ = tracked
    (run,) = wandb_runs(run_dir).values()
    assert run["config"]["model"]["name"] == "resnet10t" and run["config"]["schedule"]["epochs"] == 2
    rows = summary(run_dir)
    assert len(rows) == 2
    for row in rows:
        logged = run["history"][int(row["step"])]
        for column in ("train_loss", "eval_top1", "eval_loss", "lr"):
            assert logged[f"epoch/{column}"] == pytest.approx(float(row[column]), rel=1e-5), column
    assert any("train/loss" in values for values in run["history"].values())  # the progress records
    assert checkpoint.load(run_dir / "last.pt")["outputs"]["wandb"] == {"run_id": run["id"]}


def test_mlflow_holds_params_epoch_metrics_and_the_final_checkpoint(tracked):
    run_dir, _ = tracked
    client = mlflow_client(run_dir)
    run_id = checkpoint.load(run_dir / "last.pt")["outputs"]["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "resnet10t" and run.data.params["schedule.epochs"] == "2"
    assert client.get_experiment(run.info.experiment_id).name == run_dir.name
    rows = summary(run_dir)
    for column in ("eval_top1", "train_loss"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, f"epoch/{column}")}
        assert history == pytest.approx({int(r["step"]): float(r[column]) for r in rows}, rel=1e-5), column
    # (the resumed copy's leg logs into the same artifact folder: a file store holds absolute paths)
    assert "best.pt" in [a.path for a in client.list_artifacts(run_id)]


def test_a_resumed_run_continues_the_same_wandb_and_mlflow_runs(tracked):
    run_dir, resumed = tracked
    (first,) = wandb_runs(run_dir).values()
    legs = wandb_runs(resumed)
    (second,) = [run for name, run in legs.items() if not (run_dir / "wandb" / name).exists()]
    rows = summary(resumed)
    assert second["id"] == first["id"]
    assert second["history"][int(rows[1]["step"])]["epoch/eval_top1"] == pytest.approx(float(rows[1]["eval_top1"]),
                                                                                       rel=1e-5)
    client = mlflow_client(resumed)
    (experiment,) = [e for e in client.search_experiments() if e.name == run_dir.name]
    (run,) = client.search_runs([experiment.experiment_id])  # the one run, continued
    assert run.info.run_id == checkpoint.load(run_dir / "last.pt")["outputs"]["mlflow"]["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["epoch/eval_top1"] == pytest.approx(float(rows[1]["eval_top1"]), rel=1e-5)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_line_and_touches_nothing(name, tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # what an environment without the package has
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "smoke.yaml", "--output", str(run_dir), *tiny_overrides(tiny_root),
              f"--set=log.outputs=[csv,{name}]"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: log.outputs: {name} needs the {name} package: pip install -e ".[{name}]"', err
    assert not run_dir.exists()


def test_a_run_without_mlflow_never_imports_it(tiny_root, tmp_path):
    """MLflow loads only for a run that names it (in a process of its own: this one has it). W&B is not
    checked: timm imports wandb itself whenever it is installed."""
    from tests import warm
    code = ("import sys\nfrom powergrad_train.cli import main\nmain(sys.argv[1:])\n"
            "print('mlflow' in sys.modules)")
    result = warm.run([sys.executable, "-c", code, "--config", "smoke.yaml", "--output", str(tmp_path / "run"),
                       *tiny_overrides(tiny_root, **{"schedule.epochs": 1})],
                      capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
