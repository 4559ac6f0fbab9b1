"""Listing an ImageFolder split the way torchvision does, minus files that are not images.

Classes are the sorted sub-folder names and files are sorted, exactly as torchvision's
ImageFolder orders them, so both backends give the same labels and sample indices.
Every file gets a fast header/trailer check (in parallel, cached by size and mtime):
DALI's CPU decoder can crash the whole process on a file that is not an image, so such
files are left out, counted and listed instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from powergrad_train.cache import cache_dir
from powergrad_train.errors import DataError, printable

CACHE_VERSION = 4  # 4: one gzip JSON per split, folders with their mtimes, files and problems
CACHE_NAME = f"listing-v{CACHE_VERSION}.json.gz"
CHUNK = 256  # files checked per task of the cold scan


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


def _decodes(path: str) -> bool:
    """Other formats (BMP, TIFF, WebP, PNM) are rare in image sets: decode them fully with PIL."""
    try:
        with Image.open(path) as image:
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
    over twice PIL's decompression-bomb limit, which PIL refuses to open, is reported too.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 32))
            tail = f.read()
            if head[:3] == b"\xff\xd8\xff":
                dims = _jpeg_frame(f)  # some writers pad after the end marker
                if b"\xff\xd9" not in tail or dims is None:
                    return "not an image, or damaged"
                return _too_large(*dims)
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        if head[12:16] != b"IHDR" or int.from_bytes(head[16:20], "big") == 0 or b"IEND" not in tail:
            return "not an image, or damaged"
        return _too_large(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
    return "" if _decodes(path) else "not an image, or damaged"


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


# A folder whose mtime is this close to the scan's start may still change within the same
# timestamp tick unseen: it is listed again next time instead of trusted.
RACY_NS = 2_000_000_000


def _read_listing(cache_file: Path) -> dict:
    try:
        with gzip.open(cache_file, "rt") as f:
            listing = json.load(f)
        return listing if listing.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, EOFError):
        return {}


def _mtime_ns(folder: str) -> Optional[int]:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _unchanged(top: Path, listing: dict) -> bool:
    """True when no folder of the tree changed since it was listed: files added, removed or renamed
    change their folder's mtime, so nothing needs listing or checking again."""
    trusted = listing.get("started_ns", 0) - RACY_NS
    folders = [(str(top), listing.get("mtime_ns"))] + [(os.path.join(top, f["path"]), f["mtime_ns"])
                                                       for f in listing.get("folders", [])]
    return bool(listing) and all(m is not None and m < trusted and _mtime_ns(folder) == m for folder, m in folders)


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


def _list(top: Path, earlier: dict, verbose: bool) -> dict:
    """Walk the split and check its image files, reusing the earlier answers of folders that did not
    change. Files are checked in parallel, a bounded chunk of one folder per task."""
    started = time.time_ns()
    classes = sorted(d.name for d in os.scandir(top) if d.is_dir())
    trusted = earlier.get("started_ns", 0) - RACY_NS
    reuse = {f["path"]: f for f in earlier.get("folders", []) if f["mtime_ns"] is not None and f["mtime_ns"] < trusted}
    folders, loops, todo = [], [], []
    for label, name in enumerate(classes):
        for folder, names in sorted(_walk(top / name, loops)):
            rel, mtime = os.path.relpath(folder, top), _mtime_ns(folder)
            images = [n for n in names if n.lower().endswith(IMG_EXTENSIONS)]
            old = reuse.get(rel)
            if old and old["mtime_ns"] == mtime and old["class"] == label:
                folders.append(old)
                continue
            entry = {"class": label, "path": rel, "mtime_ns": mtime, "files": images, "problems": {}}
            folders.append(entry)
            todo += [(entry, images[i:i + CHUNK]) for i in range(0, len(images), CHUNK)]
    count = sum(len(names) for _, names in todo)
    if verbose and count > CHUNK:
        print(f"data: checking {count} image file(s) in {printable(top)} (once; later starts reuse the result)",
              flush=True)

    def check(task):
        entry, names = task
        return entry, {n: p for n in names if (p := problem_with(os.path.join(top, entry["path"], n)))}

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        for entry, problems in pool.map(check, todo):
            entry["problems"].update(problems)
    return {"version": CACHE_VERSION, "started_ns": started, "mtime_ns": _mtime_ns(str(top)), "classes": classes,
            "folders": folders, "loops": loops}


_cache_warned = False


def _write_cache(path: Path, write) -> bool:
    """The scan cache is an optimisation: a folder we cannot write (a read-only home on a cluster)
    only costs a rescan next time, said once. `write(tmp_path)` writes the content."""
    global _cache_warned
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        write(tmp)
        os.replace(tmp, path)
        return True
    except OSError as e:
        if not _cache_warned:
            print(f"data: cannot write the file-scan cache under {printable(path.parent)} ({e.strerror or e}); going on "
                  "without it (set POWERGRAD_TRAIN_CACHE to a writable folder to keep it)", flush=True)
            _cache_warned = True
        return False


def _save_listing(path: Path, listing: dict) -> None:
    def write(tmp):
        with gzip.open(tmp, "wt", compresslevel=1) as f:  # level 1: a fraction of level 9's time
            json.dump(listing, f, separators=(",", ":"))
    _write_cache(path, write)


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

    The result is cached per split; a later start whose folders are all unchanged (their mtimes)
    reads it without listing or checking any file.
    """
    folder = root / split
    check_split(root, split)
    scan_dir = cache_dir() / "scans" / hashlib.sha1(os.fsencode(folder.resolve())).hexdigest()[:16]
    cache_file = scan_dir / f"{CACHE_NAME}"
    listing = _read_listing(cache_file)
    fresh = not _unchanged(folder, listing)
    if fresh:
        listing = _list(folder, listing, verbose)
        _save_listing(cache_file, listing)
    _report(folder, scan_dir / "skipped.txt", listing, verbose, write=fresh)
    classes, samples = listing["classes"], []
    for f in listing["folders"]:
        base = os.path.join(folder, f["path"])
        samples += [(os.path.join(base, n), f["class"]) for n in f["files"] if n not in f["problems"]]
    labels = {label for _, label in samples}
    missing = [label for label in range(len(classes)) if label not in labels]
    for label in missing:
        if not any(f["files"] for f in listing["folders"] if f["class"] == label):
            raise DataError(f"{printable(folder / classes[label])}: class folder holds no images")
    if missing:
        raise DataError(f"{printable(folder / classes[missing[0]])}: no usable image left in this class after the scan"
                        + (f" (and {len(missing) - 1} more class(es))" if len(missing) > 1 else ""))
    return Split(classes, samples)


def _report(folder: Path, report: Path, listing: dict, verbose: bool, write: bool) -> None:
    """Say which links and files are left out; a fresh listing also lists the files in `report`."""
    loops = listing["loops"]
    if loops and verbose:
        print(f"data: skipped {len(loops)} folder link(s) in {printable(folder)} that lead back to a folder already "
              f"read ({', '.join(printable(os.path.relpath(p, folder)) for p in loops[:3])})", flush=True)
    bad = {os.path.join(folder, f["path"], n): reason for f in listing["folders"] for n, reason in f["problems"].items()}
    if write and not bad:
        with contextlib.suppress(OSError):
            report.unlink(missing_ok=True)
    listed = bool(bad) and (_write_cache(report, lambda tmp: tmp.write_text(
        "".join(f"{printable(p)}  ({bad[p]})\n" for p in sorted(bad)))) if write else report.exists())
    if bad and verbose:
        first = sorted(bad)[:3]
        names = "; ".join(f"{printable(os.path.relpath(p, folder))}: {bad[p]}" for p in first) \
            + ("; ..." if len(bad) > 3 else "")
        print(f"data: skipped {len(bad)} unusable file(s) in {printable(folder)} ({names})"
              + (f"; list in {printable(report)}" if listed else ""), flush=True)
