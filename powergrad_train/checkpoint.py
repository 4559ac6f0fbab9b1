"""Checkpoints: atomic writes, loading with clear errors, and every RNG state for exact resume.

Files in the run folder: `epoch-NNNN.pt` (the last `keep_last` epochs), `last.pt` and
`best.pt`. Each file is written to a temporary name, fsynced and renamed, so a kill at
any moment leaves the previous file intact; last.pt and best.pt are hard links to the
numbered file when the filesystem allows, so an epoch costs one write.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from powergrad_train.errors import CheckpointError

FORMAT = "powergrad-train-checkpoint/1"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _link_atomic(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src`, atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here: copy
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a powergrad-train checkpoint")
    return state


def load_model_weights(model: torch.nn.Module, state: dict, path: Path, model_name: str) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model '{model_name}' ({str(e).splitlines()[0]})") from None


class Checkpointer:
    """Writes a run's checkpoints (rank 0 only) and finds them again."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.run_dir, self.keep_last = Path(run_dir), keep_last

    def remove_partial_files(self) -> None:
        """Temporary files a killed run left behind (the checkpoints themselves are intact)."""
        for tmp in self.run_dir.glob(".*.pt.tmp*"):
            tmp.unlink(missing_ok=True)

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def save(self, state: dict, epoch: int, is_best: bool, numbered: bool = True) -> None:
        """numbered=False (a checkpoint inside an epoch) writes last.pt only."""
        if self.keep_last == 0 or not numbered:
            save_atomic(state, self.last)
        else:
            numbered = self.run_dir / f"epoch-{epoch:04d}.pt"
            save_atomic(state, numbered)
            _link_atomic(numbered, self.last)
        if is_best:
            _link_atomic(self.last, self.best)
        self._prune()

    def _prune(self) -> None:
        numbered = sorted(p for p in self.run_dir.glob("epoch-*.pt") if re.fullmatch(r"epoch-\d+\.pt", p.name))
        for old in numbered[:max(0, len(numbered) - self.keep_last)]:
            old.unlink()


def rng_state() -> dict:
    """Every RNG the run draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
