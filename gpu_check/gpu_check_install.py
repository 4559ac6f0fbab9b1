"""Make DALI importable on a machine without network: install its wheels from a local folder.

    python gpu_check/gpu_check_install.py [WHEELS_DIR]      # default: $DALI_WHEELS

DALI for this torch (nvidia-dali-cuda130 for a CUDA 13 torch, nvidia-dali-cuda120 for CUDA 12)
needs, besides the DALI wheel, the packages its metadata requires that the machine lacks; on a
CUDA 13 GPU image with torch these are typically nvidia-nvimgcodec-cu13, nvidia-nvjpeg, optree,
gast and astunparse (pip download them elsewhere: `pip download nvidia-dali-cuda130==2.4.0`).

Every wheel in the folder whose distribution is not installed yet is extracted into
site-packages, the folder torch itself is installed in (not --target plus PYTHONPATH: the
nvidia/__init__.py of nvimgcodec's wheel would then shadow the image's own nvidia packages); a
file already there is never overwritten. Then it prints which of DALI's requirements are still
missing. Exit status 0 when DALI imports afterwards, 1 when not (the DALI steps then skip).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import sysconfig
import zipfile
from pathlib import Path


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def wheel_name(path: Path) -> str:
    return normalized(path.name.split("-")[0])


def extract_wheel(wheel: Path, site: Path) -> int:
    """Unpack one wheel into `site` (its .data/purelib and .data/platlib too); files already there are
    kept. Returns the number of files written."""
    written = 0
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.infolist():
            name = member.filename
            if member.is_dir():
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import
                name = "/".join(parts[2:])
            target = site / name
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.chmod(tmp, (member.external_attr >> 16) & 0o777 or 0o644)
            os.replace(tmp, target)
            written += 1
    return written


def dali_wheel_for_torch() -> str:
    import torch
    return "nvidia-dali-cuda120" if (torch.version.cuda or "").startswith("12.") else "nvidia-dali-cuda130"


def missing_requirements(dist: str) -> list[str]:
    """The requirements of an installed distribution that are not installed (markers and extras honoured)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["(not checked: the packaging module is not installed)"]
    found = []
    for text in importlib.metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        if not installed(req.name):
            found.append(str(req))
    return found


def install(folder: Path | None, site: Path) -> bool:
    """Install what the folder holds and the machine lacks; True when DALI imports afterwards."""
    dali = dali_wheel_for_torch()
    if installed(dali):
        print(f"DALI present: {dali} {importlib.metadata.version(dali)}")
        return True
    if folder is None or not folder.is_dir():
        print(f"DALI is not installed and no wheel folder was given ({folder or 'set DALI_WHEELS'}): the check needs "
              f"the {dali} wheel and the ones its metadata requires that this machine lacks (on a CUDA 13 image: "
              "nvidia-nvimgcodec-cu13, nvidia-nvjpeg, optree, gast, astunparse)")
        return False
    wheels = sorted(folder.glob("*.whl"))
    if not any(wheel_name(w) == dali for w in wheels):
        print(f"{folder} holds no {dali} wheel (it holds: {', '.join(w.name for w in wheels) or 'no wheels'})")
        return False
    for wheel in wheels:
        if installed(wheel_name(wheel)):
            print(f"kept: {wheel.name} (already installed)")
            continue
        print(f"installed: {wheel.name} ({extract_wheel(wheel, site)} files into {site})")
    importlib.invalidate_caches()
    missing = missing_requirements(dali)
    print(f"{dali} requirements still missing: {', '.join(missing)}" if missing else
          f"{dali}: every requirement is installed")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        print(f"DALI still does not import: {e}")
        return False
    print(f"DALI imports: {importlib.metadata.version(dali)}")
    return True


def main():
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else (Path(os.environ["DALI_WHEELS"])
                                                         if os.environ.get("DALI_WHEELS") else None)
    sys.exit(0 if install(folder, Path(sysconfig.get_paths()["platlib"])) else 1)


if __name__ == "__main__":
    main()
