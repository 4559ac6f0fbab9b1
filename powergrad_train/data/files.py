"""Listing an ImageFolder split the way torchvision does, minus files that are not images.

Classes are the sorted sub-folder names and files are sorted, exactly as torchvision's
ImageFolder orders them, so both backends give the same labels and sample indices.
Every file gets a fast header/trailer check (in parallel, cached by size and mtime):
DALI's CPU decoder can crash the whole process on a file that is not an image, so such
files are left out, counted and listed instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from powergrad_train.data.demo import cache_dir
from powergrad_train.errors import DataError


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


def _scan(paths: list[str], cache_file: Path) -> dict[str, str]:
    """{path: problem} for the paths that fail the check, reusing earlier answers for unchanged files."""
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}

    def check(path):
        try:
            st = os.stat(path)
        except OSError as e:  # a dangling link, a file removed meanwhile
            return path, None, f"cannot be opened ({e.strerror or e})"
        key = f"{st.st_size}:{st.st_mtime_ns}"
        hit = cached.get(path)
        return path, key, hit[1] if hit and hit[0] == key else problem_with(path)

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        results = list(pool.map(check, paths, chunksize=256))
    fresh = {path: [key, problem] for path, key, problem in results if key is not None}
    if fresh != cached:
        _write_cache(cache_file, json.dumps(fresh))
    return {path: problem for path, _, problem in results if problem}


_cache_warned = False


def _write_cache(path: Path, text: str) -> bool:
    """The scan cache is an optimisation: a folder we cannot write (a read-only home on a cluster)
    only costs a rescan next time, said once."""
    global _cache_warned
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return True
    except OSError as e:
        if not _cache_warned:
            print(f"data: cannot write the file-scan cache under {path.parent} ({e.strerror or e}); going on "
                  "without it (set POWERGRAD_TRAIN_CACHE to a writable folder to keep it)", flush=True)
            _cache_warned = True
        return False


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


def _image_files(class_folder: Path, loops: list[str]) -> list[str]:
    """Image paths of one class, in torchvision's ImageFolder order."""
    return [os.path.join(folder, name) for folder, names in sorted(_walk(class_folder, loops))
            for name in names if name.lower().endswith(IMG_EXTENSIONS)]


def check_split(root: Path, split: str) -> list[str]:
    """The class names of root/split, after cheap checks: the folder, its classes, an image in each."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"data.root: {root} has no '{split}/' folder (expected an ImageFolder root with train/ and val/)")
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders (expected one sub-folder of images per class)")
    for name in classes:
        if not _image_files(folder / name, []):
            raise DataError(f"{folder / name}: class folder holds no images")
    return classes


def list_split(root: Path, split: str, verbose: bool) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label), ...]) of root/split, unusable files left out and reported."""
    folder = root / split
    classes = check_split(root, split)
    samples, loops = [], []
    for label, name in enumerate(classes):
        samples += [(path, label) for path in _image_files(folder / name, loops)]
    if loops and verbose:
        print(f"data: skipped {len(loops)} folder link(s) in {folder} that lead back to a folder already read "
              f"({', '.join(os.path.relpath(p, folder) for p in loops[:3])})", flush=True)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    scan_dir = cache_dir() / "scans" / key
    bad = _scan([p for p, _ in samples], scan_dir / "checked-v3.json")  # v3: the reason, formats beyond JPEG/PNG
    if bad:
        samples = [(p, label) for p, label in samples if p not in bad]
        report = scan_dir / "skipped.txt"
        listed = _write_cache(report, "".join(f"{p}  ({bad[p]})\n" for p in sorted(bad)))
        if verbose:
            first = sorted(bad)[:3]
            names = "; ".join(f"{os.path.relpath(p, folder)}: {bad[p]}" for p in first) + ("; ..." if len(bad) > 3 else "")
            print(f"data: skipped {len(bad)} unusable file(s) in {folder} ({names})"
                  + (f"; list in {report}" if listed else ""), flush=True)
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise DataError(f"{folder / empty[0]}: no usable image left in this class after the scan"
                        + (f" (and {len(empty) - 1} more class(es))" if len(empty) > 1 else ""))
    return classes, samples
