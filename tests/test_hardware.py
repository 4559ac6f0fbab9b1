"""GPU generations: what the installed builds can drive, told before any CUDA work (faked GPUs on the CPU)."""

import subprocess
import sys

import pytest
import torch

from powergrad_train import hardware
from powergrad_train.cli import main
from powergrad_train.config import build_config, check_runtime
from powergrad_train.errors import ConfigError
from powergrad_train.hardware import Gpu, build_runs_on, precision_in_use, problems
from tests.conftest import REPO, tiny_overrides

V100 = Gpu(0, "Tesla V100-SXM2-32GB", (7, 0))
T4 = Gpu(0, "Tesla T4", (7, 5))
A100 = Gpu(0, "NVIDIA A100-SXM4-80GB", (8, 0))
RTX3090 = Gpu(0, "NVIDIA GeForce RTX 3090", (8, 6))
H100 = Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1's default (CUDA 13.0) wheel
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("arch_list,gpu,runs", [
    (CU130, V100, False), (CU130, T4, True), (CU130, RTX3090, True), (CU130, H100, True),
    (CU126, V100, True), (["sm_80"], RTX3090, True),  # a binary for 8.0 runs on 8.6
    (["sm_86"], A100, False), (["sm_90a"], H100, True), (["sm_90a"], Gpu(0, "x", (9, 1)), False),
    (["sm_80", "compute_80"], H100, True),  # PTX is compiled for newer GPUs at load time
    (["sm_90"], Gpu(0, "B200", (10, 0)), False), ([], H100, False),
])
def test_which_builds_run_on_which_gpus(arch_list, gpu, runs):
    assert build_runs_on(arch_list, gpu.capability) is runs


def test_this_machines_torch_build_is_what_the_check_expects():
    """The real arch list of the installed torch: the default wheel has no Volta kernels."""
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert not build_runs_on(torch.cuda.get_arch_list(), V100.capability)
        assert build_runs_on(torch.cuda.get_arch_list(), H100.capability)


def test_a_v100_under_the_cuda13_build_names_the_install_that_works():
    found = problems([V100], CU130, "torch 2.14.1+cu130, CUDA 13.0", "nvidia-dali-cuda130", dali_on_gpu=True)
    assert len(found) == 2
    assert found[0].startswith("GPU 0 (Tesla V100-SXM2-32GB, compute capability 7.0) cannot run this torch build "
                               "(torch 2.14.1+cu130, CUDA 13.0, kernels for sm_75 sm_80")
    assert "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126 " \
           "&& pip install -e '.[dali-cuda12]'" in found[0]
    assert "cannot decode with the installed DALI (nvidia-dali-cuda130: compute capability 7.5 and newer)" in found[1]
    # the fix: both CUDA 12 builds
    assert problems([V100], CU126, "torch 2.14.1+cu126, CUDA 12.6", "nvidia-dali-cuda120", dali_on_gpu=True) == []
    # DALI decoding on the CPU does not need DALI's GPU support
    assert len(problems([V100], CU126, "t", "nvidia-dali-cuda130", dali_on_gpu=False)) == 0


def test_the_cli_stops_before_any_cuda_work_with_one_line(tiny_root, monkeypatch, capsys):
    monkeypatch.setattr(hardware, "visible_gpus", lambda: [V100])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "smoke.yaml", "--output", "never", *tiny_overrides(tiny_root)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: GPU 0 (Tesla V100-SXM2-32GB, compute capability 7.0) "
                                               "cannot run this torch build")


def test_bf16_needs_ampere_and_fp16_is_suggested():
    cfg = build_config(None, ["amp=bf16"])
    with pytest.raises(ConfigError, match=r"amp = bf16 needs a GPU of compute capability 8.0 or newer .* this one "
                                          r"is 7.0 .*: use amp: fp16"):
        check_runtime(cfg, 1, cuda=True, capability=(7, 0))
    check_runtime(cfg, 1, cuda=True, capability=(8, 0))
    check_runtime(build_config(None, ["amp=fp16"]), 1, cuda=True, capability=(7, 0))


def test_the_precision_in_use_is_spelled_out():
    assert precision_in_use("off", True, None) == "float32"
    assert precision_in_use("fp16", True, (7, 0)) == \
        "fp16 autocast with loss scaling (GradScaler), float32 weights; no TF32 on this GPU"
    assert precision_in_use("bf16", True, (9, 0)) == "bf16 autocast, float32 weights; float32 matmuls and " \
                                                     "convolutions in TF32"
    assert precision_in_use("off", False, (8, 6)) == "float32; TF32 off (full float32)"


def test_env_command_reports_the_stack(monkeypatch, capsys):
    result = subprocess.run([sys.executable, "-m", "powergrad_train", "env"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith(f"torch {torch.__version__}, CUDA ") and "cuDNN" in lines[1] and "NCCL" in lines[1]
    assert any(line.startswith("DALI: ") for line in lines)
    if not torch.cuda.is_available():
        assert "GPUs: none (training runs on the CPU, distributed with gloo)" in lines
    assert lines[-1] == "supported: yes"
    monkeypatch.setattr(hardware, "visible_gpus", lambda: [V100])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130)
    with pytest.raises(SystemExit) as exit_:
        main(["env"])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert "GPU 0 (Tesla V100-SXM2-32GB, compute capability 7.0): see below" in out.out
    assert "problem: GPU 0 (Tesla V100-SXM2-32GB, compute capability 7.0) cannot run this torch build" in out.out
    expected = 1 + (hardware.dali_flavour() == "nvidia-dali-cuda130")  # DALI's CUDA 13 build has no Volta either
    assert out.err.strip() == f"error: {expected} GPU problem(s) with this install (listed above)"

