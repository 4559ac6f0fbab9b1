"""Files the program opens, reads and appends to, as a user's disk may hold them: entries that are
not regular files, image modes the two data backends must decode alike, logs cut short by a full
disk or a kill, and checkpoints of other trainers given as model.init_from."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from powergrad_train.cli import main
from powergrad_train.config.build import build_config
from powergrad_train.data import build_val_loader, files
from powergrad_train.data.demo import write_demo_dataset
from powergrad_train.data.imagefolder import Unreadable, load_rgb
from powergrad_train.system.errors import CheckpointError
from powergrad_train.training import outputs
from powergrad_train.training.models import build_model, load_initial_weights
from tests import warm
from tests.conftest import in_a_forked_process, tiny_overrides

# ----------------------------------------------------------------------------- entries that are not files


def test_entries_that_are_not_regular_files_are_skipped_and_counted_never_read(tmp_path, capsys):
    """A link to /dev/zero never ends and a FIFO blocks its open: neither is read, each is left out
    and counted like an unreadable image, and so is such an entry met by the loader later."""
    write_demo_dataset(tmp_path, {"train": 2, "val": 1})
    folder = tmp_path / "train" / "circle"
    (folder / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(folder / "fifo.png")
    (folder / "album.jpg").mkdir()  # a folder named like an image is a folder: its images are read
    Image.new("RGB", (8, 8)).save(folder / "album.jpg" / "inner.png")
    split = files.list_split(tmp_path, "train", verbose=True)
    names = sorted(os.path.relpath(p, folder) for p, _ in split.samples if p.startswith(str(folder)))
    assert names == ["album.jpg/inner.png", *sorted(p.name for p in folder.glob("*.jpg") if p.is_file()
                                                   and not p.is_symlink())]
    out = capsys.readouterr().out
    assert "data: skipped 2 unusable file(s) in" in out
    assert "circle/fifo.png: a FIFO (named pipe), not a regular file" in out
    assert "circle/zero.jpg: a character device, not a regular file" in out
    # An entry replaced after the listing (a file swapped for a FIFO) is skipped when read, never waited on.
    swapped = tmp_path / "swapped.jpg"
    os.mkfifo(swapped)
    assert load_rgb(str(swapped)) == Unreadable(str(swapped), "a FIFO (named pipe), not a regular file")


# ----------------------------------------------------------------------------- one meaning of a file's pixels

SIZE = 16


def _png(path: Path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (PIL writes 16-bit grey only): color type 2 RGB, 0 grey."""
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _with_orientation(orientation: int) -> dict:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return {"exif": exif}


def write_image_modes(root: Path) -> dict[str, tuple[np.ndarray, int]]:
    """One file per mode, each its own class (its label names it): {name: (the pixels as the one
    meaning says, in 8-bit RGB; the levels a backend may differ from them)}."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 15, y * 15, (x + 2 * y) * 5], -1).astype(np.uint8)  # asymmetric: a turn shows
    wide = np.stack([x * 4000 + y * 37, y * 4100 + 13, (x + y) * 2000 + 200], -1).astype(np.uint16)
    grey = rgb[..., 0]
    bits = (x + y) % 3 == 0
    alpha = ((x * 17) % 256).astype(np.uint8)  # from fully transparent to opaque
    index = ((x + y) % 8).astype(np.uint8)
    palette = np.array([[10 * i, 255 - 20 * i, (37 * i) % 256] for i in range(8)], np.uint8)

    def repeated(g):
        return np.repeat(g[..., None], 3, -1)

    made = {}

    def save(name, expected, tolerance, write):
        folder = root / "val" / f"{len(made):02d}-{name}"
        folder.mkdir(parents=True)
        write(folder / name)
        made[name] = (expected, tolerance)

    save("rgb.png", rgb, 0, lambda p: Image.fromarray(rgb).save(p))
    save("grey.png", repeated(grey), 0, lambda p: Image.fromarray(grey).save(p))
    save("1-bit.png", repeated(bits * np.uint8(255)), 0, lambda p: Image.fromarray(bits).save(p))
    # 16-bit: scaled to 8 bits (round(v / 257)), never clipped at 255
    save("grey-16-bit.png", repeated(((wide[..., 0].astype(int) + 128) // 257).astype(np.uint8)), 0,
         lambda p: Image.fromarray(wide[..., 0]).save(p))
    # (PIL reads 16-bit colour as the high byte: one level off DALI's rounding at most)
    save("rgb-16-bit.png", ((wide.astype(int) + 128) // 257).astype(np.uint8), 1, lambda p: _png(p, wide, 2))
    # transparency dropped, the colour under it kept
    save("rgba.png", rgb, 0, lambda p: Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(p))
    save("grey-alpha.png", repeated(grey), 0, lambda p: Image.fromarray(np.dstack([grey, alpha]), "LA").save(p))

    def palette_image(p):
        image = Image.fromarray(index, "P")
        image.putpalette(palette.tobytes())
        image.save(p, transparency=bytes([0, 128] + [255] * 6))  # one entry clear, one half-transparent
    save("palette-transparency.png", palette[index], 0, palette_image)
    # CMYK: both decoders turn PIL's CMYK of an RGB image back into that RGB (JPEG's loss aside)
    save("cmyk.jpg", rgb, 2, lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=100))
    # EXIF orientation: the image as viewers show it (6: turned clockwise, 8: counter-clockwise)
    save("orientation-6.jpg", np.rot90(rgb, -1), 2,
         lambda p: Image.fromarray(rgb).save(p, quality=100, subsampling=0, **_with_orientation(6)))
    save("orientation-8.png", np.rot90(rgb, 1), 0, lambda p: Image.fromarray(rgb).save(p, **_with_orientation(8)))
    return made


def decoded_levels(backend: str, root: Path) -> list[np.ndarray]:
    """Each val image as the backend's val pipeline delivers it (crop = the whole image, no resize),
    back in 8-bit levels (float: what normalising left of them)."""
    cfg = build_config(None, [f"data.root={root}", f"data.backend={backend}", "data.dali_device=cpu",
                              f"data.image_size={SIZE}", "data.crop_pct=1.0", "data.batch_size=4",
                              "data.workers=1"]).data
    loader, _ = build_val_loader(cfg, rank=0, world_size=1)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    images = [((x * std + mean) * 255).permute(1, 2, 0).numpy() for batch, _ in loader for x in batch]
    loader.close()
    return images


def test_both_backends_decode_every_image_mode_to_the_same_pixels(tmp_path):
    made = write_image_modes(tmp_path)
    decoded = {backend: decoded_levels(backend, tmp_path) for backend in ("torchvision", "dali")}
    for backend, images in decoded.items():
        assert len(images) == len(made), backend
        for (name, (expected, tolerance)), image in zip(made.items(), images):
            off = np.abs(image - expected).max()
            assert off <= tolerance + 0.01, f"{backend}: {name} is {off:.1f} levels off"
    for name, a, b in zip(made, *decoded.values()):
        assert np.abs(a - b).max() <= 3.01, f"{name}: the backends differ"


# ----------------------------------------------------------------------------- a signal during the first scan

# The CLI in a process whose file checks hang, as reads on a network file system that stopped answering.
HUNG_SCAN = """
import sys, threading
from powergrad_train.cli import main
from powergrad_train.data import files

def hung(path):
    print("a read hangs", flush=True)
    threading.Event().wait(20)
    print("a hung read came back", flush=True)
    return ""

files.problem_with = hung
main(sys.argv[1:])
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_the_first_scan_ends_it_at_once_in_one_true_line(tmp_path, signum):
    """Not waiting for the scan's reads (nor the files not yet read); the line does not point to a run
    to continue, as none exists yet; and SIGTERM (a scheduler's stop) says so too."""
    write_demo_dataset(tmp_path / "data", {"train": 2, "val": 1})
    run_dir = tmp_path / "run"
    proc = warm.popen([sys.executable, "-c", HUNG_SCAN, "--config", "smoke.yaml", "--output", str(run_dir),
                       *tiny_overrides(tmp_path / "data")], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "a read hangs\n", proc.communicate()[1][-2000:]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert "a hung read came back" not in out
    what = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert err.splitlines() == [f"error: {what}: stopped at once, before this run wrote any checkpoint (nothing to "
                                "continue: run the same command again to start it)"], err[-2000:]
    assert proc.returncode == 128 + signum
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["validate", "bench"])
def test_a_stop_signal_while_validate_or_bench_starts_is_one_line(two_epoch_run, tmp_path, command):
    """The commands that train nothing lasting end as a start does: at once, in one line, 128 + signal."""
    write_demo_dataset(tmp_path / "data", {"train": 2, "val": 1})
    args = {"validate": ["validate", "--checkpoint", str(two_epoch_run / "last.pt"), "--set", f"data.root={tmp_path / 'data'}"],
            "bench": ["bench", "--config", "smoke.yaml", "--data", "real",
                      *[a for o in tiny_overrides(tmp_path / "data") for a in ("--set", o.removeprefix("--set="))]]}
    proc = warm.popen([sys.executable, "-c", HUNG_SCAN, *args[command]], stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline() == "a read hangs\n", proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert err.splitlines() == [f"error: stopped by SIGTERM: {command} stopped at once (nothing it writes is left "
                                "half-written; run it again)"], err[-2000:]
    assert proc.returncode == 128 + signal.SIGTERM


# ----------------------------------------------------------------------------- logs: a full disk, a torn tail

def run_output_on_a_full_disk(output: outputs.Output, run_dir: Path) -> str:
    """`output` started in `run_dir` and given one epoch's row, then another in a forked process that
    may not make a file much larger than it is now (as on a full disk: EFBIG). What the second raised."""
    output.start(outputs.RunInfo(run_dir, {}, start_epoch=0, start_step=0, resumed_from=None))
    row = {c: 1 for c in outputs.SUMMARY_COLUMNS}
    output.epoch_end(row)

    def on_a_full_disk() -> str:
        import resource
        size = max(p.stat().st_size for p in run_dir.iterdir())
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
        output.epoch_end({**row, "epoch": 2})
        return "written"

    return in_a_forked_process(on_a_full_disk)


@pytest.mark.parametrize("output,name", [(outputs.SummaryCsv, outputs.SUMMARY_CSV), (outputs.JsonLines, outputs.JSONL)])
def test_a_log_write_that_fails_is_one_error_naming_the_file_and_leaves_whole_lines(tmp_path, output, name):
    raised = run_output_on_a_full_disk(output(), tmp_path)
    assert raised == f"WriteError: {tmp_path / name}: cannot write (File too large)"
    # As before the failed write: the header or the start record, and the first row; the part of the second
    # row that fitted was cut off again.
    lines = (tmp_path / name).read_text().splitlines(keepends=True)
    assert len(lines) == 2 and lines[-1].endswith("\n")


def test_a_full_disk_at_the_first_log_record_is_one_line(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    result = warm.run([sys.executable, "-m", "powergrad_train", "--config", "smoke.yaml", "--output", str(run_dir),
                       *tiny_overrides(tiny_root, **{"log.outputs": "[console,csv,jsonl]"})],
                      capture_output=True, text=True, timeout=300, file_size_limit=40)
    assert result.stderr.splitlines() == [f"error: {run_dir / 'log.jsonl'}: cannot write (File too large)"], \
        result.stderr[-3000:]
    assert result.returncode == 2
    assert (run_dir / "log.jsonl").read_bytes() == b""  # not half a record


def test_torn_last_lines_of_the_logs_are_dropped_at_resume_and_said_once(two_epoch_run, tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epoch_run, run_dir, ignore=shutil.ignore_patterns("epoch-*.pt", "best.pt"))
    summary = (run_dir / "summary.csv").read_text()
    (run_dir / "summary.csv").write_text(summary + "2,2")  # a row cut short after a few bytes
    records = [{"kind": "start", "step": 0, "epoch": 0, "resumed_from": None},
               {"kind": "epoch", "step": 20, "epoch": 2, "eval_top1": float("nan")}]
    whole = "".join(f"{outputs.json.dumps(r)}\n" for r in records)
    (run_dir / "log.jsonl").write_text(whole + '{"kind": "progress", "st')
    resume = ["--config", "smoke.yaml", "--output", str(run_dir), "--resume", "auto",
              *tiny_overrides(tiny_root, **{"log.outputs": "[console,csv,jsonl]"})]
    main(resume)
    out = capsys.readouterr().out.splitlines()
    torn = "dropped its last line, cut short when it was written (a full disk or a kill); the rest is kept"
    assert [line for line in out if "cut short" in line] == [f"{run_dir / 'summary.csv'}: {torn}",
                                                              f"{run_dir / 'log.jsonl'}: {torn}"]
    assert (run_dir / "summary.csv").read_text().replace("\r\n", "\n") == summary.replace("\r\n", "\n")
    lines = (run_dir / "log.jsonl").read_text().splitlines(keepends=True)
    assert "".join(lines[:2]) == whole and all(outputs.json.loads(line) for line in lines)
    main(resume)
    assert "cut short" not in capsys.readouterr().out


def test_a_run_with_no_outputs_says_so_at_start(tiny_root, tmp_path, capsys):
    from powergrad_train.system.dist import DistEnv
    from powergrad_train.training.run import build_run
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(tiny_root, **{"log.outputs": "[]"})]
    trainer = build_run(build_config("smoke.yaml", overrides), tmp_path / "run", DistEnv(), torch.device("cpu"))
    trainer.close()
    assert "warning: log.outputs is empty: this run prints no progress and writes no summary.csv" in \
        capsys.readouterr().out


# ----------------------------------------------------------------------------- model.init_from

def tiny_model() -> torch.nn.Module:
    return build_model(build_config(None, ["model.name=resnet10t", "model.num_classes=10"]).model)


def test_init_from_takes_timm_s_and_the_authors_checkpoints_as_validate_does(tmp_path):
    """timm's train.py and the PGT authors' fork save their argparse Namespace beside the weights;
    validate's allow-list takes it, and so does model.init_from; anything else both refuse alike."""
    from powergrad_train.reproduction import authors
    from tests.test_authors import save_like_timm_0412, their_args
    trained = tiny_model()
    theirs = save_like_timm_0412(tmp_path / "model_best.pth.tar", trained, their_args(model="resnet10t"))
    timm_now = tmp_path / "checkpoint-3.pth.tar"  # today's train.py: from inside DDP, with its EMA weights
    torch.save({"epoch": 3, "arch": "resnet10t", "version": 2, "metric": 1.0,
                "args": argparse.Namespace(model="resnet10t", lr=0.1, model_ema=True),
                "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()},
                "state_dict_ema": trained.state_dict()}, timm_now)
    for path in (theirs, timm_now):
        model = tiny_model()
        assert load_initial_weights(model, path) == f"weights from {path}"
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    code = save_like_timm_0412(tmp_path / "code.pth.tar", trained, their_args(lr=argparse.ArgumentParser))
    with pytest.raises(CheckpointError) as validate_says:
        authors.load_checkpoint(code)
    with pytest.raises(CheckpointError) as init_from_says:
        load_initial_weights(tiny_model(), code)
    assert str(init_from_says.value) == f"model.init_from: {validate_says.value}"
    assert "so it is not loaded (loading it could run code)" in str(validate_says.value)


def test_init_from_errors_name_the_key_and_what_the_path_is(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(tiny_model().state_dict(), run / "last.pt")
    (run / "epoch-0001.pt").write_bytes((run / "last.pt").read_bytes()[:1000])  # cut short
    os.mkfifo(tmp_path / "fifo.pth")
    expected = {
        run: f"model.init_from: {run} is a folder; give a weights file (files there: epoch-0001.pt, last.pt)",
        tmp_path / "fifo.pth": f"model.init_from: {tmp_path / 'fifo.pth'}: a FIFO (named pipe), not a regular file "
                               "(a checkpoint is a file)",
        tmp_path / "missing.pth": f"model.init_from: checkpoint not found: {tmp_path / 'missing.pth'}",
        run / "epoch-0001.pt": f"model.init_from: {run / 'epoch-0001.pt'}: not a readable checkpoint, truncated or "
                               "not a checkpoint (",
    }
    for path, message in expected.items():
        with pytest.raises(CheckpointError) as error:
            load_initial_weights(tiny_model(), path)
        assert str(error.value).startswith(message), str(error.value)


def test_a_fifo_given_for_any_file_is_one_line_and_never_opened(tmp_path, capsys):
    """A FIFO would block the open until someone writes to it: each command says what it is instead."""
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    for argv, line in [
        (["validate", "--checkpoint", fifo], f"error: {fifo}: a FIFO (named pipe), not a regular file (a checkpoint is "
                                             "a file)"),
        (["--config", "smoke.yaml", "--output", tmp_path / "run", "--resume", fifo],
         f"error: --resume: {fifo} is a FIFO (named pipe), not a checkpoint file"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main([str(a) for a in argv])
        assert stop.value.code == 2 and capsys.readouterr().err.splitlines() == [line]
