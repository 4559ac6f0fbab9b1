"""Whether the installed torch and DALI builds can drive this machine's GPUs.

Checked on every GPU run before any CUDA work: a torch build without kernels for a GPU
fails only at its first CUDA operation ("no kernel image is available"), after a warning
that is easy to miss. PyTorch's CUDA 13 builds (the default wheel of torch 2.14.1) dropped
Volta (V100, compute capability 7.0); its CUDA 12.6 builds still have it, and DALI's
CUDA 12 build supports capability 5.0 and newer while its CUDA 13 build starts at 7.5.
A driver too old for the CUDA build hides the GPUs altogether (torch.cuda.is_available() is
false); the device files and nvidia-smi still show them, and that is checked too.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from powergrad_train.system.errors import InstallError

TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"
# The CUDA 12.6 builds: the newest that still carry Volta kernels.
VOLTA_INSTALL = (f"pip install torch=={TORCH_VERSION} torchvision=={TORCHVISION_VERSION} "
                 "--index-url https://download.pytorch.org/whl/cu126 && pip install -e '.[dali-cuda12]'")
# Oldest compute capability each DALI wheel flavour supports (DALI's support matrix).
DALI_MIN_CAPABILITY = {"nvidia-dali-cuda130": (7, 5), "nvidia-dali-cuda120": (5, 0), "nvidia-dali-cuda110": (3, 5)}
BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with bf16 tensor cores
TF32_MIN_CAPABILITY = (8, 0)
# Oldest NVIDIA driver a build of each CUDA major version runs on (CUDA minor version compatibility,
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html, Table 1: CUDA 13.x
# needs >= 580, CUDA 12.x >= 525). Below it torch.cuda.is_available() is simply false.
MIN_DRIVER = {13: 580, 12: 525}
# Where an NVIDIA GPU shows itself even when CUDA cannot use it (tests point these elsewhere).
NVIDIA_DEVICE_DIR = Path("/dev")
NVIDIA_SMI = "nvidia-smi"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]

    def __str__(self) -> str:
        return f"GPU {self.index} ({self.name}, compute capability {self.capability[0]}.{self.capability[1]})"


def visible_gpus() -> list[Gpu]:
    import torch
    if not torch.cuda.is_available():
        return []
    return [Gpu(i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class NvidiaDevices:
    """What the machine shows of NVIDIA GPUs without CUDA: device files, nvidia-smi's list and driver."""
    device_files: tuple[str, ...] = ()
    listed: tuple[str, ...] = ()  # `nvidia-smi -L` lines: "GPU 0: NVIDIA H200 (UUID: ...)"
    driver: Optional[str] = None  # e.g. "550.54.15"

    @property
    def present(self) -> bool:
        return bool(self.device_files or self.listed)

    def __str__(self) -> str:
        seen = list(self.device_files[:1])
        if self.listed:
            seen.append("nvidia-smi: " + re.sub(r" \(UUID: [^)]*\)", "", self.listed[0]))
        return f"an NVIDIA GPU is present ({'; '.join(seen)})"


def _nvidia_smi(*args: str) -> list[str]:
    try:
        result = subprocess.run([NVIDIA_SMI, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # not installed, or hanging on a broken driver
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()] if result.returncode == 0 else []


def probe_nvidia() -> NvidiaDevices:
    """The NVIDIA GPUs this machine shows, whether or not CUDA can use them."""
    files = sorted(str(p) for p in NVIDIA_DEVICE_DIR.glob("nvidia[0-9]*"))
    drivers = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return NvidiaDevices(tuple(files), tuple(line for line in _nvidia_smi("-L") if line.startswith("GPU ")),
                         drivers[0] if drivers else None)


def driver_problem(cuda_build: Optional[str], cuda_available: bool, found: NvidiaDevices, build: str) -> Optional[str]:
    """One line when a CUDA build of torch sees no GPU although the machine has one (None otherwise).

    cuda_build: torch.version.cuda ("13.0"), None for a CPU build. CUDA_VISIBLE_DEVICES set to
    nothing (or -1) hides the GPUs on purpose, and is no problem.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if not cuda_build or cuda_available or not found.present or hidden:
        return None
    major = int(cuda_build.split(".")[0])
    need = MIN_DRIVER.get(major, 0)
    head = f"{found} but this torch build ({build}) cannot use it (torch.cuda.is_available() is false): "
    if found.driver and int(found.driver.split(".")[0]) >= need:
        return head + (f"its driver ({found.driver}) is new enough for CUDA {major}, so check that this process "
                       "may open /dev/nvidia* and what CUDA_VISIBLE_DEVICES says")
    has = found.driver or "an unknown one (nvidia-smi --query-gpu=driver_version shows it)"
    fix = (f"update the driver, or (with driver {MIN_DRIVER[12]} or newer) install the CUDA 12.6 builds: "
           f"{VOLTA_INSTALL}" if major > 12 else "update the driver")
    return head + (f"CUDA {major} builds of torch {TORCH_VERSION} and DALI need NVIDIA driver {need} or newer, "
                   f"this machine has {has}; {fix}")


def build_runs_on(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Can a build with these kernels (`sm_XY` binaries, `compute_XY` PTX) run on this GPU?

    A binary for X.Y runs on X.Z with Z >= Y ('a'-suffixed ones only on X.Y itself); PTX for
    X.Y is compiled at load time for any GPU of X.Y or newer.
    """
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)(a?)", arch)
        if not m:
            continue
        number = int(m.group(2))
        built = (number // 10, number % 10)
        if m.group(1) == "compute" and capability >= built:
            return True
        if m.group(1) == "sm" and (capability == built if m.group(3) else
                                   capability[0] == built[0] and capability[1] >= built[1]):
            return True
    return False


def dali_flavour() -> Optional[str]:
    """The installed DALI wheel's name (nvidia-dali-cuda130, ...), or None."""
    for name in DALI_MIN_CAPABILITY:
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def dali_runs_on(capability: tuple[int, int]) -> bool:
    """Has the installed DALI wheel GPU kernels for a GPU of this compute capability?"""
    flavour = dali_flavour()
    return flavour is not None and capability >= DALI_MIN_CAPABILITY[flavour]


def problems_per_gpu(gpus: list[Gpu], arch_list: list[str], torch_build: str, dali: Optional[str],
                     dali_on_gpu: bool) -> dict[Gpu, list[str]]:
    """For each GPU, a line per reason the installed builds cannot drive it, with the install that can."""
    found = {}
    for gpu in gpus:
        lines = found.setdefault(gpu, [])
        if not build_runs_on(arch_list, gpu.capability):
            if gpu.capability < (7, 5):
                fix = f"install PyTorch's CUDA 12.6 build, which has Volta kernels: {VOLTA_INSTALL}"
            else:
                fix = "install a torch build for a newer CUDA that lists this GPU's architecture"
            lines.append(f"{gpu} cannot run this torch build ({torch_build}, kernels for "
                         f"{' '.join(arch_list) or 'no GPU'}); {fix}")
        if dali_on_gpu and dali and gpu.capability < DALI_MIN_CAPABILITY[dali]:
            low = DALI_MIN_CAPABILITY[dali]
            lines.append(f"{gpu} cannot decode with the installed DALI ({dali}: compute capability "
                         f"{low[0]}.{low[1]} and newer); {VOLTA_INSTALL} (or data.dali_device: cpu)")
    return found


def problems(gpus: list[Gpu], arch_list: list[str], torch_build: str, dali: Optional[str],
             dali_on_gpu: bool) -> list[str]:
    """One line per reason a GPU cannot be driven by the installed builds, GPU by GPU."""
    return [line for lines in problems_per_gpu(gpus, arch_list, torch_build, dali, dali_on_gpu).values()
            for line in lines]


def torch_build() -> str:
    import torch
    return f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


def check_gpus(dali_on_gpu: bool) -> list[Gpu]:
    """The visible GPUs, after making sure the installed builds can drive them (else InstallError).

    No visible GPU while the machine has one (a driver too old for the CUDA build) is an error
    too: such a run would train on the CPU without saying so.
    """
    import torch
    gpus = visible_gpus()
    if not gpus:
        problem = driver_problem(torch.version.cuda, torch.cuda.is_available(), probe_nvidia(), torch_build())
        if problem:
            raise InstallError(problem)
    else:
        found = problems(gpus, torch.cuda.get_arch_list(), torch_build(), dali_flavour(), dali_on_gpu)
        if found:
            raise InstallError(found[0] + (f" (and {len(found) - 1} more problem(s): powergrad-train env lists them)"
                                           if len(found) > 1 else ""))
    return gpus


class MemoryOutsideTorch:
    """GPU memory taken outside torch's caching allocator since construction: what the device's free
    memory (torch.cuda.mem_get_info) lost, less what torch itself reserved meanwhile. DALI's pools,
    prefetch queues and decoded images live there, where torch's allocator statistics cannot see them."""

    def __init__(self, device):
        import torch
        self.device = device
        torch.cuda.synchronize(device)
        self.free, self.reserved = torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device)

    def taken(self) -> int:
        """Bytes, now."""
        import torch
        torch.cuda.synchronize(self.device)
        free, reserved = torch.cuda.mem_get_info(self.device)[0], torch.cuda.memory_reserved(self.device)
        return (self.free - free) - (reserved - self.reserved)


def precision_in_use(amp: str, tf32: bool, capability: Optional[tuple[int, int]]) -> str:
    """What the run computes in, for the start-up block (capability None: the CPU)."""
    if amp == "fp16":
        text = "fp16 autocast with loss scaling (GradScaler), float32 weights"
    elif amp == "bf16":
        text = "bf16 autocast, float32 weights"
    else:
        text = "float32"
    if capability is not None:
        if capability >= TF32_MIN_CAPABILITY:
            text += "; float32 matmuls and convolutions in TF32" if tf32 else "; TF32 off (full float32)"
        else:
            text += "; no TF32 on this GPU"
    return text


def report() -> tuple[list[str], list[str]]:
    """(lines describing the installed stack and the GPUs, problems found) for `powergrad-train env`."""
    import platform

    import timm
    import torch
    import torchvision

    from powergrad_train import __version__
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cudnn = f"{version // 10000}.{version // 100 % 100}.{version % 100}" if version else None  # 92400 = 9.24.0
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        nccl = None
    dali = dali_flavour()
    lines = [
        f"powergrad-train {__version__}, Python {platform.python_version()}",
        f"{torch_build()}, cuDNN {cudnn or 'none'}, NCCL {nccl or 'none'}; "
        f"kernels for {' '.join(torch.cuda.get_arch_list()) or 'no GPU (a CPU build)'}",
        f"torchvision {torchvision.__version__}, timm {timm.__version__}",
        f"DALI: {f'{importlib.metadata.version(dali)} ({dali})' if dali else 'not installed'}",
    ]
    gpus = visible_gpus()
    per_gpu = problems_per_gpu(gpus, torch.cuda.get_arch_list(), torch_build(), dali, dali_on_gpu=True)
    found = [line for lines in per_gpu.values() for line in lines]
    lines += [f"{gpu}: {'see below' if per_gpu[gpu] else 'supported'}" for gpu in gpus]
    if not gpus:
        nvidia = probe_nvidia()
        problem = driver_problem(torch.version.cuda, torch.cuda.is_available(), nvidia, torch_build())
        lines.append(f"GPUs: none usable; {nvidia}, driver {nvidia.driver or 'unknown'}" if problem else
                     "GPUs: none (training runs on the CPU, distributed with gloo)")
        found += [problem] if problem else []
    return lines, found
