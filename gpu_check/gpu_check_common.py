"""What the parts of gpu_check/gpu_check.sh share: sizes, the generated JPEG folder, the result lines.

Each part prints its settings, then one line per check: `PASS: ...`, `FAIL: ...`, or `SKIP: ...`
(a step this machine cannot run, with the reason), and exits 1 when any check failed. On a
machine without a CUDA GPU the parts run at small sizes (`--size small`), so that each finishes
in a minute or two on a few CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(SCRIPTS.parent / "scripts"))
from make_jpeg_folder import make_folder  # noqa: E402

ON_GPU = torch.cuda.is_available()


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")),
                   help="the check's folder: data/ (generated JPEGs, reused) and work/ (fresh folders per run)")
    p.add_argument("--size", choices=("auto", "full", "small"), default="auto",
                   help="full: the sizes meant for one H200; small: a CPU's; auto: full when CUDA is available")
    return p


def is_small(args) -> bool:
    return args.size == "small" or (args.size == "auto" and not ON_GPU)


def jpeg_folder(out: Path, train_per_class: int, val_per_class: int) -> Path:
    """The generated ImageNet-like folder (10 classes, 500x375, quality 90), made once per size and reused."""
    return make_folder(out / "data" / f"jpegs-{train_per_class}-{val_per_class}", train_per_class, val_per_class)


def data_backend() -> str:
    """dali where DALI is installed, else torchvision (the runs then read with it)."""
    try:
        import nvidia.dali  # noqa: F401
        return "dali"
    except ImportError:
        return "torchvision"


def work_dir(out: Path, part: str) -> Path:
    """A fresh folder for this run of a part (runs never meet an earlier run's folders)."""
    import tempfile
    (out / "work").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{part}-", dir=out / "work"))


def device() -> torch.device:
    return torch.device("cuda", 0) if ON_GPU else torch.device("cpu")


def machine() -> str:
    try:
        import importlib.metadata

        from powergrad_train.system.hardware import dali_flavour
        flavour = dali_flavour()
        dali = f"DALI {importlib.metadata.version(flavour)} ({flavour})" if flavour else "DALI not installed"
    except ImportError:
        dali = "DALI not installed"
    gpu = torch.cuda.get_device_name(0) if ON_GPU else f"no GPU, {os.cpu_count()} CPU cores"
    return f"{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); {dali}; " \
           f"Python {platform.python_version()}"


class Results:
    """PASS / FAIL / SKIP lines, printed as they come; `exit()` ends the part with 1 if any failed."""

    def __init__(self, title: str, settings: str):
        self.failed = 0
        print(f"{title}\n{machine()}\n{settings}", flush=True)

    def check(self, ok: bool, what: str) -> bool:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
        return ok

    def skip(self, what: str) -> None:
        print(f"SKIP: {what}", flush=True)

    def note(self, what: str) -> None:
        print(f"  {what}", flush=True)

    def exit(self) -> None:
        sys.exit(1 if self.failed else 0)


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest ||a - b|| / ||a|| over the floating-point tensors of two state dicts (same keys)."""
    worst = 0.0
    for key, x in a.items():
        if x.is_floating_point():
            x, y = x.double().cpu(), b[key].double().cpu()
            worst = max(worst, ((x - y).norm() / x.norm().clamp_min(1e-30)).item())
    return worst
