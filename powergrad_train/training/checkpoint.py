"""Checkpoints: what a run's state is, atomic writes, and every check a resume needs.

The state of a run is a set of named parts, each with state_dict() / load_state_dict():
shared parts (model, optimizer, scaler, the TrainState record, the outputs' states, and each of
the objective, batch transform and weight average that has a state: the EMA's weights under
"ema") saved from rank 0, and per-rank parts (RNG states, the data pipeline's position, the
epoch's running metrics) gathered from every rank. build_run lists them; every part is copied to
the host once when gathered and checked for non-finite values before a save. A part named
optional that a checkpoint lacks (saved before that part kept a state) keeps its fresh state.

Files in the run folder: `epoch-NNNN.pt` (the last `keep_last` epochs), `last.pt` and
`best.pt`, and `nonfinite.pt` for a state whose steps had non-finite losses (never
last.pt). Each file is written to a temporary name, fsynced and renamed, so a kill at any
moment leaves the previous file intact; last.pt is a hard link to the numbered file when
the filesystem allows (an epoch costs one write), best.pt an independent copy. Each file
carries a checksum of its content, checked on loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import pickle
import random
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Collection, Optional, Protocol

import numpy as np
import torch

from powergrad_train.config.build import build_config
from powergrad_train.config.schema import get, keys
from powergrad_train.config.sections import Config
from powergrad_train.system.atomic import fsync_folder
from powergrad_train.system.errors import CheckpointError
from powergrad_train.system.user_files import NotAFile, check_regular

FORMAT = "powergrad-train-checkpoint/3"
FORMAT_2 = "powergrad-train-checkpoint/2"  # the train meter was a shared part (sums reduced over ranks)
FORMAT_1 = "powergrad-train-checkpoint/1"  # also: train-state fields at the top level

# The file names of a run folder: numbered epochs, the newest good state, the best epoch, and a
# state whose steps had non-finite losses.
LAST, BEST, NONFINITE = "last.pt", "best.pt", "nonfinite.pt"
CHECKPOINT_NAMES = re.compile(r"(last|best|nonfinite|epoch-\d+)\.pt")


def epoch_file(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclasses.dataclass
class TrainState:
    """Where the run stands; everything else about it lives in the other parts."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # global batches of the current epoch already trained
    step: int = 0  # optimizer steps completed, over the whole run (the LR is a function of it)
    epoch_elapsed: float = 0.0  # training seconds of the current epoch (kept across a resume)
    best_top1: float = -math.inf
    best_epoch: int = 0
    eval_pending: bool = False  # the epoch `epoch` is trained but not yet evaluated (stopped during validation)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):  # a field added later keeps its default
            setattr(self, f.name, state.get(f.name, f.default))


class RngState:
    """Every RNG the run draws from, in a form torch.load(weights_only=True) accepts."""

    def state_dict(self) -> dict:
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

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files

def to_host(state):
    """`state` with every tensor copied to the host once (a GPU tensor cannot be checksummed,
    scanned or pickled for another rank as it is); containers rebuilt, other values kept."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: to_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_host(v) for v in state)
    return state


def state_bytes(state) -> int:
    """The bytes of the tensors in a state: about the size of its file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


class _WriteRecorder:
    """A file for torch.save that keeps the OSError of a failed write: torch's zip writer turns it
    into a RuntimeError ('unexpected pos') that no longer says why."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except BaseException as e:  # an OSError, or a KeyboardInterrupt that arrived during the write
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def content_checksum(state) -> int:
    """CRC-32 over every value of a state (tensor bytes, and the repr of everything else), in order."""
    crc = 0

    def visit(value) -> None:
        nonlocal crc
        if isinstance(value, torch.Tensor):
            crc = zlib.crc32(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy(), crc)
        elif isinstance(value, dict):
            for key, item in value.items():
                crc = zlib.crc32(repr(key).encode(), crc)
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        else:
            crc = zlib.crc32(repr(value).encode(), crc)

    visit(state)
    return crc


def save_atomic(state: dict, path: Path) -> None:
    """Write `state` to `path` completely or not at all; a failed write leaves no temporary file.

    A checksum of the content goes with it, so damage done to the file later is found on loading.
    """
    state = {**state, "checksum": content_checksum(state)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    recorder = None
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            torch.save(state, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as e:  # no space, quota, permission, a vanished mount; or an interrupt
        tmp.unlink(missing_ok=True)
        error = recorder.error if recorder and recorder.error else e
        if not isinstance(error, (OSError, RuntimeError)):
            raise error from None
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else _first_line(error)
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}; it needs about "
                              f"{state_bytes(state) / 2**20:.0f} MiB)") from None


def _link_atomic(src: Path, dst: Path, copy: bool = False) -> None:
    """Make `dst` the same file as `src` (a hard link, or a copy), atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            if copy:
                raise OSError(errno.EXDEV, "a copy was asked for")
            os.link(src, tmp)
        except OSError as e:  # no hard links here: copy
            if e.errno == errno.ENOSPC:
                raise
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync_folder(dst.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {dst} ({os.strerror(e.errno) if e.errno else e})") from None


# What a weights-only load takes besides tensors and plain values: the argparse.Namespace that
# timm's train.py (and the PGT authors' fork of it) saves as `args` in its checkpoints. One list
# for every torch file this program loads: its checkpoints, model.init_from and validate's.
ALLOWED_GLOBALS = [argparse.Namespace]


def torch_load(path: Path, mmap: bool = False):
    """A torch file's content, loaded weights-only with ALLOWED_GLOBALS (nothing in it can run code),
    from a regular file only; any failure is one CheckpointError."""
    try:
        check_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except NotAFile as e:
        raise CheckpointError(f"{path}: {e} (a checkpoint is a file)") from None
    except OSError as e:
        raise load_failure(path, e) from None
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise load_failure(path, e) from None


def load(path: Path, verify: bool = True) -> dict:
    """A checkpoint file as a dict in the current format (older formats are converted). Unverified
    (its content not checked against its checksum), a file's train state costs almost nothing to
    read: the tensors are mapped, not read."""
    path = Path(path)
    state = torch_load(path, mmap=True)
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, FORMAT_2, FORMAT_1):
        raise CheckpointError(f"{path}: not a powergrad-train checkpoint")
    saved_checksum = state.pop("checksum", None)  # format 1 has none
    if verify and saved_checksum is not None and content_checksum(state) != saved_checksum:
        raise CheckpointError(f"{path}: damaged: its content no longer matches the checksum written with it "
                              "(changed in place after saving?); use another checkpoint of the run")
    if state["format"] == FORMAT_1:
        state = _from_format_1(state)
    if state["format"] == FORMAT_2:
        state = _from_format_2(state)
    return state


def load_failure(path: Path, error: Exception) -> Exception:
    """What a failed torch.load means, as a one-line error; an unexpected failure is returned as is."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, OSError):  # permissions, an I/O error, a vanished mount
        return CheckpointError(f"cannot read checkpoint {path} ({error.strerror or first})")
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return CheckpointError(f"not enough memory to load checkpoint {path} ({first})")
    if isinstance(error, pickle.UnpicklingError) and _unsafe_globals(path):
        # A file that needs arbitrary code to unpickle; powergrad-train never writes one.
        return CheckpointError(f"{path}: holds Python objects besides tensors, plain values and argparse.Namespace, "
                               "so it is not loaded (loading it could run code)")
    if isinstance(error, (RuntimeError, EOFError, pickle.UnpicklingError)):
        # The zip reader (truncated, damaged) or mmap (a file that is not a torch zip archive at all).
        return CheckpointError(f"{path}: not a readable checkpoint, truncated or not a checkpoint "
                               f"({first.split('. ')[0]})")
    return error


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects a torch file needs that the weights-only loader does not allow."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # not a readable zip archive: not the allow-list's doing
        return []


def _from_format_1(old: dict) -> dict:
    """Format 1 kept the train-state fields at the top level and steps per epoch under 'schedule'."""
    fields = [f.name for f in dataclasses.fields(TrainState)]
    state = {k: v for k, v in old.items() if k not in fields and k != "schedule"}
    state.update(format=FORMAT_2, train_state={k: old[k] for k in fields if k in old},
                 steps_per_epoch=old["schedule"]["steps_per_epoch"], world_size=len(old["rng"]))
    return state


def _from_format_2(old: dict) -> dict:
    """Format 2 saved the epoch's train sums (loss, correct, images, logit norm) reduced over ranks,
    once; now each rank saves its own (with a count of images whose loss was finite)."""
    loss, correct, images, logit_norm = old["train_meter"].tolist()
    sums = torch.tensor([loss, correct, images, logit_norm, images], dtype=torch.float64)
    meters = [{"sums": sums}] + [{"sums": torch.zeros_like(sums)} for _ in range(old["world_size"] - 1)]
    return {**old, "format": FORMAT, "train_meter": meters}


def nonfinite_tensors(state, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a state that hold a NaN or inf."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not torch.isfinite(state).all() else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [name for k, v in items for name in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def config_of(state: dict, path: Path) -> Config:
    """The run's config as stored; keys renamed or removed since then are ignored with a warning."""
    return build_config(None, start=(f"{path} (its config)", state["config"]), lenient=True)


def _first_line(error: Exception) -> str:
    """The first line that says something: torch's load_state_dict puts the mismatch on line 2."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (useful or lines or [type(error).__name__])[0]


def load_model_weights(model: torch.nn.Module, state: dict, path: Path, model_name: str) -> None:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model '{model_name}' ({_first_line(e)})") from None


def check_classes(state: dict, path: Path, classes: list[str], where: str = "data.root") -> None:
    """The data's class folders are the ones the checkpoint was trained on, in the same order."""
    saved = list(state.get("classes") or [])
    if saved and saved != list(classes):
        first = next((f"'{a}' where it had '{b}'" for a, b in zip(classes, saved) if a != b),
                     f"{len(classes)} classes where it had {len(saved)}")
        raise CheckpointError(f"{path}: trained on other classes than {where} holds ({first})")


# A data set that lost or gained a few files since the checkpoint changes the steps an epoch
# would have by at most this share (at least one step): the run goes on with its own.
STEPS_TOLERANCE = 0.01


def check_compatible(state: dict, path: Path, cfg: Config, *, classes: list[str], steps_per_epoch: int,
                     world_size: int, force: bool) -> None:
    """Every reason a checkpoint cannot continue this run, as one kind of error."""
    saved = config_of(state, path)
    if saved.optim.name != cfg.optim.name:  # settings may change under --resume-force, state of another kind not
        raise CheckpointError(
            f"--resume {path}: its optimizer state is {saved.optim.name}'s, which optim.name = {cfg.optim.name} "
            f"cannot continue from, even with --resume-force; resume with optim.name={saved.optim.name}, or start a "
            f"new run from its weights with model.init_from={path}")
    if not force:
        changed = [f"{k.dotted}: {get(saved, k.dotted)!r} -> {get(cfg, k.dotted)!r}"
                   for k in keys().values() if k.meta["fixed"] and get(saved, k.dotted) != get(cfg, k.dotted)]
        if changed:
            raise CheckpointError(f"--resume {path}: the recipe changes keys that define the run: "
                                  f"{'; '.join(changed)} (pass --resume-force to resume anyway)")
    check_classes(state, path, classes)
    if abs(state["steps_per_epoch"] - steps_per_epoch) > max(1, int(STEPS_TOLERANCE * state["steps_per_epoch"])):
        raise CheckpointError(f"{path}: saved with {state['steps_per_epoch']} steps per epoch, "
                              f"this run has {steps_per_epoch} (another data set or batch size)")
    if state["train_state"]["batch_in_epoch"] and state["world_size"] != world_size:
        raise CheckpointError(f"{path}: saved inside an epoch by {state['world_size']} process(es); "
                              f"resume it with the same number (this run has {world_size})")


# ----------------------------------------------------------------------------- the run's checkpoints

class Checkpointer:
    """Saves and restores a run's parts; rank 0 writes the files.

    parts: saved once (from rank 0), restored on every rank.
    per_rank: gathered from every rank, each rank restores its own entry when the world
    size is unchanged (an epoch-boundary checkpoint may resume on another world size).
    optional: names of parts that a checkpoint may lack: such a part keeps its fresh state.
    """

    def __init__(self, run_dir: Path, keep_last: int, parts: dict[str, Stateful], per_rank: dict[str, Stateful],
                 meta: dict, optional: Collection[str] = ()):
        self.run_dir, self.keep_last = Path(run_dir), keep_last
        self.parts, self.per_rank, self.meta, self.optional = parts, per_rank, meta, frozenset(optional)

    @property
    def last(self) -> Path:
        return self.run_dir / LAST

    @property
    def best(self) -> Path:
        return self.run_dir / BEST

    @property
    def nonfinite(self) -> Path:
        return self.run_dir / NONFINITE

    def remove_partial_files(self) -> None:
        """Temporary files a killed run left behind (the checkpoints themselves are intact)."""
        for tmp in self.run_dir.glob(".*.pt.tmp*"):
            tmp.unlink(missing_ok=True)

    def state_dict(self, gather) -> dict:
        """The whole state, on the host; `gather(obj)` returns the list of every rank's obj."""
        state = {"format": FORMAT, **self.meta}
        state.update({name: to_host(part.state_dict()) for name, part in self.parts.items()})
        state.update({name: gather(to_host(part.state_dict())) for name, part in self.per_rank.items()})
        return state

    def nonfinite_parts(self, state: dict) -> list[str]:
        """Names of the non-finite tensors in every part of `state` (a state from state_dict())."""
        return nonfinite_tensors({name: state[name] for name in (*self.parts, *self.per_rank)})

    def restore(self, state: dict, path: Path, rank: int, world_size: int) -> None:
        """Load every part of `state` (checked by check_compatible) into this run."""
        for name, part in self.parts.items():
            if name not in state and name in self.optional:
                continue
            if name not in state:
                raise CheckpointError(f"{path}: has no {name} (saved by a run without it); resume with the "
                                      "recipe it was saved with")
            try:
                part.load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: its {name} does not fit this run ({_first_line(e)})") from None
        if state["world_size"] == world_size:
            for name, part in self.per_rank.items():
                part.load_state_dict(state[name][rank])

    def write(self, state: dict, epoch: int, is_best: bool, numbered: bool) -> Path:
        """Rank 0: write `state` as last.pt (and the numbered file at epoch ends, best.pt if best)."""
        if self.keep_last == 0 or not numbered:
            save_atomic(state, self.last)
        else:
            path = self.run_dir / epoch_file(epoch)
            save_atomic(state, path)
            _link_atomic(path, self.last)
        if is_best:  # a copy, so damage to last.pt in place (an interrupted copy over it) spares best.pt
            _link_atomic(self.last, self.best, copy=True)
        self.nonfinite.unlink(missing_ok=True)  # superseded by a good state
        self._prune()
        return self.last

    def restore_last(self, path: Path) -> None:
        """Make last.pt a copy of `path`, a checkpoint of this run chosen because last.pt is missing
        or damaged, so the folder holds a good last.pt even if nothing more is trained."""
        _link_atomic(path, self.last, copy=True)

    def write_nonfinite(self, state: dict) -> Path:
        """A state whose steps had non-finite losses: kept apart, so last.pt stays good."""
        save_atomic(state, self.nonfinite)
        return self.nonfinite

    def _prune(self) -> None:
        numbered = sorted(p for p in self.run_dir.glob("epoch-*.pt") if re.fullmatch(r"epoch-\d+\.pt", p.name))
        for old in numbered[:max(0, len(numbered) - self.keep_last)]:
            old.unlink()

    def space_warning(self, state_size: int) -> Optional[str]:
        """A line when the run folder has less free space than the checkpoints this run keeps."""
        files = self.keep_last + 2  # the numbered files, best.pt once it stops being one of them, a temp file
        needed = files * state_size
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            return None
        if free >= needed:
            return None
        return (f"warning: {self.run_dir} has {free / 2**20:.0f} MiB free; this run's checkpoints need about "
                f"{needed / 2**20:.0f} MiB ({files} files of {state_size / 2**20:.0f} MiB: checkpoint.keep_last "
                f"= {self.keep_last}, best.pt, a temporary file)")


def describe(path: Path) -> str:
    """`path (epoch E, step S)` for messages, or 'none yet'."""
    if not path.exists():
        return "none yet"
    try:
        s = load(path)["train_state"]
    except CheckpointError:
        return f"{path} (unreadable)"
    return f"{path} (epoch {s['epoch']}, step {s['step']})"

