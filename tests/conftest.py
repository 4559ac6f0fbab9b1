"""Shared fixtures: a tiny generated ImageFolder and tiny run settings."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from powergrad_train.data.demo import write_demo_dataset
from tests import warm

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """The tests send Ctrl-C to the processes they start, as a terminal would. A shell starts a
    background job (`cmd &`, nohup, some CI runners) with SIGINT ignored, which every process started
    from it inherits and keeps (as the program must): the suite's processes start as a terminal's."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_finish(session):
    """Tests that start real processes start them from a server that has torch and timm imported:
    it starts now, beside the first tests, if any collected test uses it."""
    def uses_warm(module):
        return any(v is warm or getattr(v, "__globals__", {}).get("warm") is warm for v in vars(module).values())
    if warm.SERVER is None and any(uses_warm(item.module) for item in session.items if hasattr(item, "module")):
        warm.SERVER = warm.Server(REPO)


def pytest_sessionfinish(session):
    if warm.SERVER is not None:
        warm.SERVER.close()
        warm.SERVER = None


@pytest.fixture(autouse=True, scope="session")
def _session_isolation(tmp_path_factory):
    """What the whole session shares is temporary: the cache (the demo set is generated once into it),
    no POWERGRAD_TRAIN_* setting of the user's, a working directory for session and module fixtures.
    Undone when the session ends."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("POWERGRAD_TRAIN_")]:
            mp.delenv(name)
        mp.setenv("POWERGRAD_TRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        yield
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _test_isolation(tmp_path_factory):
    """Each test starts in an empty working directory of its own: a default output folder (`runs/`),
    a relative path, or what the README's demo left in the checkout never reaches another test."""
    cwd, before = tmp_path_factory.mktemp("cwd"), os.getcwd()
    os.chdir(cwd)
    yield
    os.chdir(before)
    shutil.rmtree(cwd, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    """A folder for a module's shared runs, removed when the module's tests are done (the suite's
    disk use stays that of a few runs)."""
    path = tmp_path_factory.mktemp("module")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """10 demo classes, 16 train / 6 val images each."""
    root = tmp_path_factory.mktemp("tiny_imagefolder")
    write_demo_dataset(root, {"train": 16, "val": 6})
    return root


def refused(capsys, *args) -> str:
    """Run the command in this process; it must end with one `error:` line and exit status 2."""
    from powergrad_train.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tiny_overrides(root: Path, **extra) -> list[str]:
    """--set values for a run of a few seconds: resnet10t at 16 px, 10 steps per epoch."""
    values = {
        "model.name": "resnet10t", "model.num_classes": 10, "data.root": str(root), "data.image_size": 16,
        "data.crop_scale_min": 0.35, "data.batch_size": 16, "data.workers": 0, "optim.lr": 0.05,
        "schedule.epochs": 2, "schedule.warmup_epochs": 0.5, "schedule.cooldown_epochs": 0,
        "schedule.warmup_lr": 0.005, "train.log_every_steps": 4, "checkpoint.keep_last": 2,
    }
    values.update(extra)
    return [f"--set={k}={v}" for k, v in values.items()]


def _has_a_cpu_compiler() -> bool:
    """What model.compile's start-up check finds: torch's own search for a C++ compiler."""
    from powergrad_train.system.errors import ConfigError
    from powergrad_train.training.models import check_compile
    try:
        check_compile(cuda=False)
    except ConfigError:
        return False
    return True


# torch.compile on the CPU builds its kernels with a C++ compiler: on a machine without one these tests
# are skipped, saying so (tests/test_inputs.py checks that such a machine gets one line at start).
needs_a_cpu_compiler = pytest.mark.skipif(not _has_a_cpu_compiler(),
                                          reason="torch.compile on the CPU needs a C++ compiler; this machine has none")


def in_a_forked_process(work) -> str:
    """What `work()` returns (a str), or the exception it raised as 'Name: message', run in a real other
    process forked from this one (no new interpreter): for what a process may not do to itself."""
    read, write = os.pipe()
    if (child := os.fork()) == 0:
        try:
            os.write(write, work().encode())
        except BaseException as e:
            os.write(write, f"{type(e).__name__}: {e}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as f:
        return f.read().decode()


def load_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="session")
def two_epoch_run(tiny_root, tmp_path_factory) -> Path:
    """The tiny settings trained for their 2 epochs: epoch-0001.pt, epoch-0002.pt, last.pt, best.pt,
    summary.csv and diagnostics/. Shared by every test that only reads or copies it."""
    from powergrad_train.cli import main
    run_dir = tmp_path_factory.mktemp("two_epochs") / "run"
    main(["--config", "smoke.yaml", "--output", str(run_dir), *tiny_overrides(tiny_root)])
    return run_dir
