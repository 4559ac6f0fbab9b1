"""A run folder is never clobbered, and a refused command writes nothing."""

import os
import shutil
import signal
import sys

import pytest

from powergrad_train.cli import main
from powergrad_train.training import checkpoint
from powergrad_train.training.run_folder import MARKER
from tests import warm
from tests.conftest import assert_same_weights, in_a_forked_process, load_weights, tiny_overrides
from tests.test_fault_tolerance import SMALL_BATCH, start, wait_for


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_second_training_into_the_same_folder_is_refused(tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "shared"
    overrides = tiny_overrides(tiny_root, **SMALL_BATCH, **{"checkpoint.every_steps": 5})
    first = start(run_dir, overrides)
    wait_for(run_dir / "last.pt", first)
    before = checkpoint.load(run_dir / "last.pt")["train_state"]["step"]
    line = refused(capsys, "--config", "smoke.yaml", "--output", run_dir, "--resume", "auto", *overrides)
    assert line == (f"error: --output: {run_dir} is in use by another training (pid {first.pid}); "
                    "wait for it to end or choose another --output")
    wait_for(run_dir / checkpoint.epoch_file(1), first)  # the first run went on, untouched
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode in (0, 128 + signal.SIGTERM), err[-2000:]
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["step"] > before
    assert (run_dir / "summary.csv").read_text().splitlines()[1].split(",")[0] == "1"


def test_a_folder_that_is_not_a_run_is_refused_and_untouched(tiny_root, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    (project / "summary.csv").write_text("my,own\n")
    before = snapshot(project)
    line = refused(capsys, "--config", "smoke.yaml", "--output", project, *tiny_overrides(tiny_root))
    assert line == (f"error: --output: {project} is not empty and is not a powergrad-train run folder; "
                    "choose a new or empty folder")
    assert snapshot(project) == before


def test_a_checkpoint_from_elsewhere_cannot_overwrite_a_run(two_epoch_run, tiny_root, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(two_epoch_run, other)
    before = snapshot(other)
    line = refused(capsys, "--config", "smoke.yaml", "--output", other, "--resume", two_epoch_run / "epoch-0001.pt",
                   *tiny_overrides(tiny_root))
    assert "already holds a run; a checkpoint from elsewhere would overwrite it" in line
    assert snapshot(other) == before


def test_a_refused_resume_writes_nothing(two_epoch_run, tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(two_epoch_run, run_dir)
    (run_dir / "summary.csv").unlink()
    before = snapshot(run_dir)
    fewer = tmp_path / "fewer"  # the same data less one class: the checkpoint's classes differ
    shutil.copytree(tiny_root, fewer)
    for split in ("train", "val"):
        shutil.rmtree(fewer / split / "vstripes")
    line = refused(capsys, "--config", "smoke.yaml", "--output", run_dir, "--resume", "auto",
                   *tiny_overrides(fewer))
    assert "trained on other classes than data.root holds" in line
    assert snapshot(run_dir) == before


def test_resume_auto_without_last_pt_takes_the_newest_valid_checkpoint(two_epoch_run, tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "nolast"
    run_dir.mkdir()
    for name in ("epoch-0001.pt", "summary.csv"):
        shutil.copy(two_epoch_run / name, run_dir / name)
    (run_dir / "epoch-0002.pt").write_bytes(b"truncated")  # newer, but unusable
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *tiny_overrides(tiny_root)])
    assert f"resuming from {run_dir / 'epoch-0001.pt'}: {run_dir / 'last.pt'} is missing" in capsys.readouterr().out
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), load_weights(run_dir / "last.pt"))


def test_resume_auto_refuses_a_folder_whose_checkpoints_are_all_unusable(tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / MARKER).touch()  # a run of this program, whose only checkpoint is damaged
    (run_dir / "epoch-0003.pt").write_bytes(b"not a checkpoint")
    line = refused(capsys, "--config", "smoke.yaml", "--output", run_dir, "--resume", "auto",
                   *tiny_overrides(tiny_root))
    assert line.startswith(f"error: --resume auto: {run_dir} holds checkpoints but none is usable")
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "epoch-0003.pt"]


def overwrite_middle(path, size=4 * 2**20):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 - size // 2)
        f.write(os.urandom(size))


@pytest.mark.parametrize("best_epoch", [2, 1])
def test_damage_in_place_is_found_and_best_pt_survives_it(two_epoch_run, tiny_root, tmp_path, capsys, best_epoch):
    """Whichever epoch best.pt holds, the run ends with a good last.pt: trained on from epoch 1, or (the
    run already finished) put back from best.pt."""
    run_dir = tmp_path / "damaged"
    shutil.copytree(two_epoch_run, run_dir)  # copies hard links as separate files: make them links again
    (run_dir / "last.pt").unlink()
    os.link(run_dir / "epoch-0002.pt", run_dir / "last.pt")
    shutil.copy(run_dir / f"epoch-{best_epoch:04d}.pt", run_dir / "best.pt")  # an independent copy, as written
    size = (run_dir / "last.pt").stat().st_size
    overwrite_middle(run_dir / "last.pt")
    assert (run_dir / "last.pt").stat().st_size == size
    line = refused(capsys, "validate", "--checkpoint", run_dir / "last.pt")
    assert line == (f"error: {run_dir / 'last.pt'}: damaged: its content no longer matches the checksum written "
                    "with it (changed in place after saving?); use another checkpoint of the run")
    checkpoint.load(run_dir / "best.pt")  # independent of last.pt, so still good
    newest_valid = "best.pt" if best_epoch == 2 else "epoch-0001.pt"  # epoch-0002.pt is last.pt
    main(["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto", *tiny_overrides(tiny_root)])
    assert f"resuming from {run_dir / newest_valid}: {run_dir / 'last.pt'} is damaged" in capsys.readouterr().out
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["epoch"] == 2  # a good last.pt, whatever the path
    assert_same_weights(load_weights(two_epoch_run / "last.pt"), load_weights(run_dir / "last.pt"))


@pytest.mark.parametrize("case", ["a file", "read-only parent"])
def test_a_run_folder_that_cannot_be_made_is_one_line(tiny_root, tmp_path, capsys, case):
    if case == "a file":
        target = tmp_path / "file"
        target.write_text("x")
        expected = f"error: --output: {target} is a file, not a folder"
    else:
        if os.geteuid() == 0:  # root writes anywhere: use a path below a file instead
            parent = tmp_path / "plain"
            parent.write_text("x")
            target = parent / "run"
        else:
            parent = tmp_path / "ro"
            parent.mkdir(mode=0o500)
            target = parent / "run"
        expected = f"error: --output: cannot create or write the run folder {target} ("
    line = refused(capsys, "--config", "smoke.yaml", "--output", target, *tiny_overrides(tiny_root))
    assert line.startswith(expected), line


def test_resuming_an_older_checkpoint_in_its_own_folder_is_refused_and_a_new_folder_branches(two_epoch_run, tiny_root,
                                                                                            tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epoch_run, run_dir)
    overwrite_middle(run_dir / "epoch-0002.pt")  # damaged in content: still history, named below
    before = snapshot(run_dir)
    older = run_dir / "epoch-0001.pt"
    rollback = ["--resume", older, "--resume-force", *tiny_overrides(tiny_root), "--set=optim.lr=0.5"]
    line = refused(capsys, "--config", "smoke.yaml", "--output", run_dir, *rollback)
    assert line.startswith(f"error: --resume: {older} is at epoch 1, step 10, but {run_dir} goes on beyond it (")
    for later in ("epoch-0002.pt (epoch 2, step 20)", "last.pt (epoch 2, step 20)", "summary.csv rows of epoch 2"):
        assert later in line
    assert line.endswith(f"which continuing in this folder would overwrite; to branch from it, pass a new --output "
                         f"(for example {run_dir}-from-epoch-0001)")
    assert snapshot(run_dir) == before
    branch = tmp_path / "branch"
    main(["--config", "smoke.yaml", "--output", str(branch), *[str(a) for a in rollback]])
    assert [r.split(",")[0] for r in (branch / "summary.csv").read_text().splitlines()[1:]] == ["2"]
    assert snapshot(run_dir) == before


def limited_run(run_dir, overrides, max_bytes, *extra):
    """The CLI in a process that may not write a file over `max_bytes` (as on a full disk: EFBIG)."""
    return warm.run([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--output", str(run_dir),
                     *overrides, *extra], capture_output=True, text=True, timeout=300,
                    file_size_limit=max_bytes)


@pytest.mark.parametrize("max_bytes,failing", [(400, "config.yaml"),  # the lock's pid and the first event fit
                                               (1, "events.out.tfevents.*")])
def test_a_start_on_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny_root, tmp_path, max_bytes, failing):
    run_dir = tmp_path / "run"
    result = limited_run(run_dir, tiny_overrides(tiny_root), max_bytes)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [f"error: {run_dir / failing}: cannot write (File too large)"]
    assert not (run_dir / "config.yaml").exists() and not list(run_dir.glob(".*tmp*"))


def test_the_lock_refuses_a_second_claim_from_its_own_process_and_keeps_holding(tmp_path):
    """A POSIX lock would be granted again to its own process, and dropped when that process closes
    any descriptor of the file: the second claim must be refused without opening it."""
    from powergrad_train.system.errors import RunFolderError
    from powergrad_train.training.run_folder import RunFolderLock
    run_dir = tmp_path / "run"
    lock = RunFolderLock(run_dir)
    with pytest.raises(RunFolderError, match=f"is in use by another training \\(pid {os.getpid()}\\)"):
        RunFolderLock(run_dir)

    def claim() -> str:
        RunFolderLock(run_dir).release()
        return "granted"

    def claim_from_another_process() -> str:
        return in_a_forked_process(claim)
    assert f"is in use by another training (pid {os.getpid()})" in claim_from_another_process()  # still held
    lock.release()
    assert claim_from_another_process() == "granted"
