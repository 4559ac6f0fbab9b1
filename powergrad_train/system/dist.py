"""The torchrun environment: rank, world size, process group, reductions."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from powergrad_train.system.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (a plain run is rank 0 of 1)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


# The store the processes met through (torchrun's, or one rank 0 serves): errors are shared there.
_store = None


def init(env: DistEnv, device: torch.device) -> None:
    """NCCL on GPUs, gloo on the CPU; nothing for a single process."""
    global _store
    if env.distributed and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        _store = _meet(env, timeout)
        torch_dist.init_process_group(backend, store=_store, rank=env.rank, world_size=env.world_size,
                                      timeout=timeout, device_id=device if device.type == "cuda" else None)


def _meet(env: DistEnv, timeout: timedelta):
    """The store of torchrun's environment, with a namespace of this attempt's own: torchrun's store
    outlives a restart (--max-restarts), and a restarted process group that read the keys of the
    attempt before would connect to the addresses of processes that are gone."""
    store, _, _ = next(torch_dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    store.set_timeout(timeout)
    return torch_dist.PrefixStore(f"powergrad-train/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                                  store)


def close() -> None:
    if torch_dist.is_initialized():
        error = sys.exc_info()[1]
        if isinstance(error, Exception) and not lost_a_peer(error):  # on the way out of an error of its own:
            note_failure()  # say so before the others see the connections close (see failed_after_another)
        elif lost_a_peer(error):
            outlast_the_stop()  # (cli.main says what was lost)
        torch_dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj) -> list:
    if not torch_dist.is_initialized():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(compute):
    """compute() on rank 0 only; every rank returns its result, or raises its error."""
    if not torch_dist.is_initialized():
        return compute()
    box = [None]
    if torch_dist.get_rank() == 0:
        try:
            box = [(compute(), None)]
        except Exception as e:
            # The others raise the same user error; a bug keeps its traceback on rank 0.
            box = [(None, e if isinstance(e, UserError) else PeerFailed(f"failed on rank 0: {type(e).__name__}"))]
            torch_dist.broadcast_object_list(box, src=0)
            raise
    torch_dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


# ----------------------------------------------------------------------------- errors of a distributed run

class PeerFailed(Exception):
    """Another process of the run failed; it says why itself."""


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is torch's word that another process failed or vanished (its DistError
    family: a closed connection, a store gone, a backend error), gloo's, or ours."""
    return isinstance(error, (PeerFailed, torch_dist.DistError)) or connection_lost(error)


# gloo reports a peer that vanished (kill -9, out of memory, a machine gone) as a plain RuntimeError
# from its TCP transport ("[.../gloo/transport/tcp/pair.cc:545] Read error [addr]:port: Connection reset
# by peer. This is typically caused by ..."); tests/test_faults_and_state.py kills a process to check
# that this is still how it says so.
_GLOO_TRANSPORT = re.compile(r"\[[^\]]*gloo/transport/[^\]]*\]\s*")


def connection_lost(error: BaseException) -> bool:
    """Whether `error` is gloo's word that the connection to another process broke."""
    return isinstance(error, RuntimeError) and bool(_GLOO_TRANSPORT.search(str(error)))


def lost_peer_reason(error: BaseException) -> str:
    """What the lost-peer `error` says, in a few words: its first sentence, without gloo's source location."""
    text = _GLOO_TRANSPORT.sub("", (str(error).strip().splitlines() or [""])[0])
    return f"{type(error).__name__}: {text.split('. ')[0]}".rstrip(": ")


def outlast_the_stop() -> None:
    """Ignore SIGTERM from here on. When a process of the run ends, torchrun stops the others with it;
    one already on its way out of an error (a peer lost) finishes saying why instead of dying mid-way."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _errors_key(name: str) -> str:
    return f"powergrad-train/errors/{name}"  # (the store is this attempt's own: see _meet)


def _errors_store(env: DistEnv):
    """The store for sharing errors: the run's own, or (before dist.init) a new client of it."""
    if _store is not None:
        return _store
    try:
        return _meet(env, timedelta(seconds=10))
    except (RuntimeError, ValueError):  # no store there (rank 0 already gone) or no torchrun environment
        return None


def report_once(line: str) -> bool:
    """Whether this process is the one to print user error `line`. Under torchrun each distinct
    line is printed once, whichever process found it, by the first process to claim it in the
    run's store; without a store, rank 0 prints."""
    env = env_from_torchrun()
    if not env.distributed:
        return True
    store = _errors_store(env)
    if store is None:
        return env.is_main
    note_failure(store)
    try:
        return store.add(_errors_key(hashlib.sha1(line.encode(errors="replace")).hexdigest()), 1) == 1
    except (RuntimeError, ValueError):  # the store went away: better a line twice than none
        return True


_failed_as = 0  # this process's place among those of the run that failed (1: the first), 0: none yet


def note_failure(store=None) -> int:
    """Count this process, once, among those of the run that failed; its place in that count."""
    global _failed_as
    store = store or _store
    if store is not None and not _failed_as:
        with contextlib.suppress(RuntimeError, ValueError):
            _failed_as = store.add(_errors_key("failed"), 1)
    return _failed_as


def failed_after_another() -> bool:
    """Whether another process of the run failed before this one: then an error here (a collective
    whose peer left, a gloo connection closed) is a consequence of that one, which says why."""
    return note_failure() > 1


def another_failed(wait_s: float = 5.0) -> bool:
    """Whether another process of the run failed, waiting up to `wait_s` for one to say so (it may
    be about to: torch's lost-peer errors can arrive first)."""
    if _store is None:
        return False
    deadline = time.monotonic() + wait_s
    try:
        while _store.add(_errors_key("failed"), 0) <= (1 if _failed_as else 0):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
    except (RuntimeError, ValueError):  # the store went away with the process that hosted it
        return True
