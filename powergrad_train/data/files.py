"""Listing an ImageFolder split the way torchvision does, minus files that are not images.

Classes are the sorted sub-folder names and files are sorted, exactly as torchvision's
ImageFolder orders them, so both backends give the same labels and sample indices.
Every file gets a fast header/trailer check (in parallel, cached per folder under a
fingerprint of its files' names, sizes and times): DALI's CPU decoder can crash the whole
process on a file that is not an image, so such files are left out, counted and listed
instead. A file that passes but fails to decode when read is skipped by the loaders
(SkippedFiles) and recorded here too.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import gzip
import hashlib
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
import zlib
from array import array
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

from PIL import Image

from powergrad_train.system.atomic import make_folder, write_file
from powergrad_train.system.cache import cache_dir
from powergrad_train.system.errors import DataError, WriteError, printable
from powergrad_train.system.user_files import NotAFile, open_regular, read_bytes

CACHE_VERSION = 5  # 5: one gzip JSON per split, folders with their fingerprints, files and problems
CACHE_NAME = f"listing-v{CACHE_VERSION}.json.gz"
CHUNK = 256  # files checked per task of the cold scan
THREADS = min(32, (os.cpu_count() or 1) * 4)  # checking files: reads, which release the GIL
PROCESSES = min(16, os.cpu_count() or 1)  # walking and fingerprinting folders (see _walk_classes)
PATHS = "surrogateescape"  # a name that is not UTF-8 (held as surrogates) hashed as the bytes it is


def _jpeg_frame(f) -> Optional[tuple[int, int]]:
    """Walk the JPEG markers up to the start of scan: (width, height) of the frame header that must
    come first, or None when the markers do not parse."""
    f.seek(2)
    frame = None
    while True:
        if f.read(1) != b"\xff":
            return None
        kind = 0xFF
        while kind == 0xFF:  # a marker may be preceded by any number of 0xFF fill bytes
            byte = f.read(1)
            if not byte:
                return None
            kind = byte[0]
        if kind == 0xDA:  # start of scan: entropy-coded data follows
            return frame
        length = int.from_bytes(f.read(2), "big")
        if length < 2:
            return None
        body = f.read(length - 2)
        if len(body) < length - 2:
            return None
        if kind in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width, components = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            frame = (width, height) if height > 0 and width > 0 and components in (1, 3, 4) else None


def _decodes(f) -> bool:
    """Other formats (BMP, TIFF, WebP, PNM) are rare in image sets: decode them fully with PIL."""
    try:
        f.seek(0)
        with Image.open(f) as image:
            image.load()
        return True
    except Exception:  # PIL raises many types for a bad file
        return False


def problem_with(path: str) -> str:
    """Why neither backend could use this file, or '' when both can.

    JPEG (nearly every file) and PNG get a fast structural check: a JPEG whose markers parse
    up to the scan and that ends with its end marker, a PNG with its header and IEND chunk,
    which is what a garbage, empty, truncated or foreign file lacks. Any other file is decoded
    with PIL; DALI's CPU and GPU decoders read the same formats (BMP, TIFF, WebP, PNM). An image
    over twice PIL's decompression-bomb limit, which PIL refuses to open, is reported too. An
    entry that is not a regular file (a FIFO, a device, a link to one) is not read at all, and
    every read is bounded.
    """
    try:
        with open_regular(path) as f:
            head = f.read(24)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 32))
            tail = f.read(32)
            if head[:3] == b"\xff\xd8\xff":
                dims = _jpeg_frame(f)  # some writers pad after the end marker
                if b"\xff\xd9" not in tail or dims is None:
                    return "not an image, or damaged"
                return _too_large(*dims)
            if head[:8] == b"\x89PNG\r\n\x1a\n":
                if head[12:16] != b"IHDR" or int.from_bytes(head[16:20], "big") == 0 or b"IEND" not in tail:
                    return "not an image, or damaged"
                return _too_large(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
            return "" if _decodes(f) else "not an image, or damaged"
    except NotAFile as e:
        return str(e)
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})"


def _too_large(width: int, height: int) -> str:
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if limit and width * height > limit:
        return f"{width}x{height} pixels, over PIL's decompression-bomb limit of {limit} pixels"
    return ""


@dataclasses.dataclass
class Split:
    """One split of an ImageFolder: class names and (path, label) samples in torchvision's order."""

    classes: list[str]
    samples: list[tuple[str, int]]


# A file whose time is this close to the scan's start may still change within the same
# timestamp tick unseen: its folder is checked again next time instead of trusted.
RACY_NS = 2_000_000_000


# The listing's JSON compresses about 6 times (ImageNet's file names): a cache that unpacks to more
# than this many times its size, or a file that is no cache at all, is not read on: the split is
# scanned again.
MAX_UNPACKED_RATIO = 64
MAX_CACHE_BYTES = 64 << 20  # the other files of a split's cache: its read failures and skipped.txt


def _read_listing(cache_file: Path) -> dict:
    try:
        with open_regular(cache_file) as raw:
            limit = MAX_UNPACKED_RATIO * os.fstat(raw.fileno()).st_size + (1 << 20)
            with gzip.GzipFile(fileobj=raw) as f:
                text = f.read(limit + 1)
        if len(text) > limit:
            return {}
        listing = json.loads(text)
        return listing if isinstance(listing, dict) and listing.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, EOFError, zlib.error):
        return {}


def _fingerprint(folder: str, names: list[str], trusted_before_ns: int) -> Optional[str]:
    """A digest of the files' names, sizes, modification and change times: adding, removing,
    renaming or rewriting a file in place changes it. None when a file changed too recently to
    be sure (its folder is checked again next time)."""
    sizes, times = array("q"), array("q")
    try:
        fd = os.open(folder, os.O_RDONLY)  # names are looked up relative to it: no walk along the path per file
    except OSError:  # the folder went away since it was listed
        return None
    try:
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd)
            except OSError:  # a dangling link: the check reports it
                sizes.append(-1)
                continue
            sizes.append(st.st_size)
            times.append(st.st_mtime_ns)
            times.append(st.st_ctime_ns)
    finally:
        os.close(fd)
    if times and max(times) >= trusted_before_ns:
        return None
    digest = hashlib.blake2b("\0".join(names).encode(errors=PATHS), digest_size=8)
    digest.update(sizes)
    digest.update(times)
    return digest.hexdigest()


def _walk(top: Path, loops: list[str]) -> list[tuple[str, list[str]]]:
    """(folder, file names) under `top`, following links but visiting each real folder once; a link
    that leads back to a folder already visited is listed in `loops` instead."""
    seen, found = set(), []

    def visit(folder: str) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            loops.append(folder)
            return
        seen.add(real)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        dirs, files = [], []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows a link; a dangling one is a file (reported by the scan)
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(e)
        found.append((folder, sorted(e.name for e in files)))
        for d in sorted(e.path for e in dirs):
            visit(d)

    visit(str(top))
    return found


def _walk_class(task: tuple[Path, int, str, int, dict], extensions: tuple[str, ...]):
    """(folders, loops) of one class folder; per folder (label, path below the split, image names,
    fingerprint), the names None when the fingerprint is the one `known` for that path (the
    caller has them already)."""
    top, label, name, trusted_before, known = task
    found, loops = [], []
    for folder, names in sorted(_walk(top / name, loops)):
        images = [n for n in names if n.lower().endswith(extensions)]
        rel, fingerprint = os.path.relpath(folder, top), _fingerprint(folder, images, trusted_before)
        found.append((label, rel, None if fingerprint and known.get(rel) == fingerprint else images, fingerprint))
    return found, loops


def _walk_classes(tasks: list) -> list:
    """_walk_class of every class, in forked processes: a stat per file is mostly Python's work
    around the system call, which threads would queue for the GIL (measured: slower than one
    thread); processes scale with the cores, and wait on a network file system side by side.
    On an interrupt the walks not started are dropped: the pool's `with` would wait for all of
    them, and the exit waits only for the few under way (small chunks keep that short)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS  # what torchvision's ImageFolder takes
    walk = functools.partial(_walk_class, extensions=IMG_EXTENSIONS)
    processes = min(PROCESSES, len(tasks) // 16)  # a small split is not worth the processes
    if processes > 1:
        try:
            pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_leave_stop_signals_to_the_main_process)
            try:
                return list(pool.map(walk, tasks, chunksize=max(1, len(tasks) // (32 * processes))))
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        except (OSError, BrokenProcessPool):  # no processes to be had here (a container's limit), or one died
            pass
    return [walk(task) for task in tasks]


def _leave_stop_signals_to_the_main_process() -> None:
    """A walking process does not act on Ctrl-C, SIGUSR1 or SIGHUP (nor run a handler inherited from
    the main process): the main process stops the scan. SIGTERM keeps its default action, with which
    the pool ends a process when another one died."""
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_END = object()


def _in_threads(work, tasks: list, threads: int):
    """work(task) for every task, yielded as each is done (in any order), in daemon threads.

    concurrent.futures' pool, on an interrupt, waits for every task it was given, and joins its
    threads at exit: Ctrl-C during the scan of a large split would wait for the whole scan, and a
    read hung on a network file system would keep the process from ever ending. Here an
    interrupt stops the wait at once; the threads drop the tasks not started, and are not waited
    for at exit."""
    results, remaining, lock, stop = queue.SimpleQueue(), iter(tasks), threading.Lock(), threading.Event()

    def run() -> None:
        while not stop.is_set():
            with lock:
                task = next(remaining, _END)
            if task is _END:
                return
            try:
                results.put((work(task), None))
            except BaseException as e:  # a bug: raised in the main thread
                results.put((None, e))

    for _ in range(min(threads, len(tasks))):
        threading.Thread(target=run, name="powergrad-scan", daemon=True).start()
    try:
        for _ in tasks:
            result, error = results.get()
            if error is not None:
                raise error
            yield result
    finally:
        stop.set()


def _list(top: Path, earlier: dict, verbose: bool) -> dict:
    """Walk the split and check its image files, reusing the earlier answers of folders whose
    fingerprint did not change. Folders are walked and fingerprinted in processes (a class per
    task), files checked in threads (a bounded chunk of one folder's files per task)."""
    trusted_before = time.time_ns() - RACY_NS
    classes = sorted(d.name for d in os.scandir(top) if d.is_dir())
    reuse = {f["path"]: f for f in earlier.get("folders", []) if f.get("fingerprint")}
    known = [{} for _ in classes]  # per label: fingerprints of its folders as listed before
    for f in reuse.values():
        if f["class"] < len(classes):
            known[f["class"]][f["path"]] = f["fingerprint"]
    folders, loops, todo = [], [], []
    tasks = [(top, label, name, trusted_before, known[label]) for label, name in enumerate(classes)]
    for found, class_loops in _walk_classes(tasks):
        loops += class_loops
        for label, rel, images, fingerprint in found:
            if images is None:  # unchanged
                folders.append(reuse[rel])
                continue
            entry = {"class": label, "path": rel, "fingerprint": fingerprint, "files": images, "problems": {}}
            folders.append(entry)
            todo += [(entry, images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]
    count = sum(len(names) for _, names in todo)
    if verbose and count > CHUNK:
        print(f"data: checking {count} image file(s) in {printable(top)} (once; later starts reuse the result)",
              flush=True)

    def check(task):
        entry, names = task
        return entry, {n: p for n in names if (p := problem_with(os.path.join(top, entry["path"], n)))}

    for entry, problems in _in_threads(check, todo, THREADS):
        entry["problems"].update(problems)
    return {"version": CACHE_VERSION, "classes": classes, "folders": folders, "loops": loops}


_cache_warned = False


def _write_cache(path: Path, content: bytes) -> bool:
    """The scan cache is an optimisation: a folder we cannot write (a read-only home on a cluster)
    only costs a rescan next time, said once."""
    global _cache_warned
    try:
        make_folder(path.parent)
        write_file(path, lambda f: f.write(content))
        return True
    except WriteError as e:
        if not _cache_warned:
            print(f"data: cannot write the file-scan cache under {printable(path.parent)} ({e.reason}); going on "
                  "without it (set POWERGRAD_TRAIN_CACHE to a writable folder to keep it)", flush=True)
            _cache_warned = True
        return False


def _scan_dir(folder: Path) -> Path:
    """Where the cache of split `folder` lives: its listing, skipped.txt, its read failures."""
    return cache_dir() / "scans" / hashlib.sha1(os.fsencode(folder.resolve())).hexdigest()[:16]


def check_split(root: Path, split: str) -> None:
    """Cheap checks before any listing: the split folder exists and has class folders."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root: {printable(root)} has no '{split}/' folder (expected an ImageFolder root with "
                        "train/ and val/)")
    if not any(d.is_dir() for d in os.scandir(folder)):
        raise DataError(f"{printable(folder)}: no class folders (expected one sub-folder of images per class)")


def list_split(root: Path, split: str, verbose: bool) -> Split:
    """Classes and samples of root/split, unusable files left out and reported.

    The result is cached per split; a later start reads each folder's entries and stats its
    files, and checks again only the folders whose fingerprint changed.
    """
    folder = root / split
    check_split(root, split)
    scan_dir = _scan_dir(folder)
    cache_file = scan_dir / CACHE_NAME
    earlier = _read_listing(cache_file)
    listing = _list(folder, earlier, verbose)
    if listing != earlier:
        _save_listing(cache_file, listing)
    stored = _read_failures(scan_dir)
    failures = _still_failing(stored)
    if failures != stored:
        _write_cache(scan_dir / READ_FAILURES, json.dumps(failures).encode())
    _report(folder, scan_dir / "skipped.txt", listing, failures, verbose,
            write=listing != earlier or failures != stored)
    classes, samples = listing["classes"], []
    for f in listing["folders"]:
        base = os.path.join(folder, f["path"])
        samples += [(f"{base}/{n}", f["class"]) for n in f["files"] if n not in f["problems"]]  # (os.path.join's cost)
    labels = {label for _, label in samples}
    missing = [label for label in range(len(classes)) if label not in labels]
    for label in missing:
        if not any(f["files"] for f in listing["folders"] if f["class"] == label):
            raise DataError(f"{printable(folder / classes[label])}: class folder holds no images")
    if missing:
        raise DataError(f"{printable(folder / classes[missing[0]])}: no usable image left in this class after the scan"
                        + (f" (and {len(missing) - 1} more class(es))" if len(missing) > 1 else ""))
    return Split(classes, samples)


def _save_listing(path: Path, listing: dict) -> None:
    text = json.dumps(listing, separators=(",", ":"))
    _write_cache(path, gzip.compress(text.encode(), compresslevel=1))  # level 1: a fraction of level 9's time


def _report(folder: Path, report: Path, listing: dict, failures: dict, verbose: bool, write: bool) -> None:
    """Say which links and files are left out or skipped; when something changed, also list them in `report`."""
    loops = listing["loops"]
    if loops and verbose:
        print(f"data: skipped {len(loops)} folder link(s) in {printable(folder)} that lead back to a folder already "
              f"read ({', '.join(printable(os.path.relpath(p, folder)) for p in loops[:3])})", flush=True)
    bad = {os.path.join(folder, f["path"], n): reason for f in listing["folders"] for n, reason in f["problems"].items()}
    lines = {**{p: f"{printable(p)}  ({reason})\n" for p, reason in bad.items()},
             **{p: _failure_line(p, f["reason"]) for p, f in failures.items()}}
    if write and not lines:
        with contextlib.suppress(OSError):
            report.unlink(missing_ok=True)
    listed = bool(lines) and (_write_cache(report, "".join(lines[p] for p in sorted(lines)).encode())
                              if write else report.exists())
    if not verbose:
        return
    where = f"; list in {printable(report)}" if listed else ""
    if bad:
        first = sorted(bad)[:3]
        names = "; ".join(f"{printable(os.path.relpath(p, folder))}: {bad[p]}" for p in first) + ("; ..." if len(bad) > 3 else "")
        print(f"data: skipped {len(bad)} unusable file(s) in {printable(folder)} ({names}){where}", flush=True)
    if failures:
        first = sorted(failures)[:3]
        names = "; ".join(printable(os.path.relpath(p, folder)) for p in first) + ("; ..." if len(failures) > 3 else "")
        print(f"data: {len(failures)} file(s) in {printable(folder)} could not be decoded when last read and are skipped "
              f"whenever read ({names}){where}", flush=True)


# ----------------------------------------------------------------------------- files that fail when read

READ_FAILURES = "read-failures.json"


def _failure_line(path: str, reason: str) -> str:
    return f"{printable(path)}  (cannot read image: {reason}; skipped when read)\n"


def _read_failures(scan_dir: Path) -> dict:
    """{path: {"reason": ..., "stat": [size, mtime_ns, ctime_ns]}} of the files found undecodable while reading."""
    try:
        failures = json.loads(read_bytes(scan_dir / READ_FAILURES, MAX_CACHE_BYTES))
        return failures if isinstance(failures, dict) else {}
    except (OSError, ValueError):
        return {}


def _stat_key(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]  # (a rewrite that puts the old mtime back changes ctime)
    except OSError:
        return None


def _still_failing(failures: dict) -> dict:
    """The failures whose file has not changed since (a replaced or repaired file is read again)."""
    return {p: f for p, f in failures.items() if isinstance(f, dict) and _stat_key(p) == f.get("stat")}


class SkippedFiles:
    """Files of a split that passed the listing's check but cannot be decoded when read (damaged
    after the scan, or beyond what the check sees). Reading goes on without them: each is said
    once by the process that met it, counted, and recorded in the cache, so the split's
    skipped.txt lists it and later starts name it. The file stays in the listing, so every
    other sample keeps its place in the order (and its augmentation seed)."""

    def __init__(self, folder: Path, reading: str):
        self.folder, self.reading = folder, reading  # reading: "training" or "validation"
        self.earlier = set(_still_failing(_read_failures(_scan_dir(folder))))  # found by earlier runs
        self.found: list[str] = []  # found by this process, in order

    def add(self, path: str, reason: str) -> None:
        if path in self.found:
            return
        self.found.append(path)
        listed = self._record(path, reason)
        print(f"data: cannot read {printable(path)} ({reason}); {self.reading} goes on without it ({len(self.found)} file(s) "
              f"skipped so far by this process{f'; listed in {printable(listed)}' if listed else ''})", flush=True)

    def _record(self, path: str, reason: str) -> Optional[Path]:
        scan_dir = _scan_dir(self.folder)
        failures = _read_failures(scan_dir)
        failures[path] = {"reason": reason, "stat": _stat_key(path)}
        report = scan_dir / "skipped.txt"
        try:
            text = read_bytes(report, MAX_CACHE_BYTES).decode()
            kept = [line for line in text.splitlines(keepends=True) if not line.startswith(f"{printable(path)}  (")]
        except (OSError, ValueError):
            kept = []
        if not (_write_cache(scan_dir / READ_FAILURES, json.dumps(failures).encode())
                and _write_cache(report, "".join(sorted(kept + [_failure_line(path, reason)])).encode())):
            return None
        return report
