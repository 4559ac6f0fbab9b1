"""GPU generations: what the installed builds can drive, told before any CUDA work (faked GPUs on the CPU)."""


import pytest
import torch

from powergrad_train.cli import main
from powergrad_train.config.build import build_config, check_runtime
from powergrad_train.system import hardware
from powergrad_train.system.errors import ConfigError
from powergrad_train.system.hardware import Gpu, build_runs_on, precision_in_use, problems
from tests.conftest import tiny_overrides

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
    main(["env"])
    lines = capsys.readouterr().out.splitlines()
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



# ---------------------------------------------------------------- a driver too old for the CUDA build

H200_SEEN = hardware.NvidiaDevices(("/dev/nvidia0",), ("GPU 0: NVIDIA H200 (UUID: GPU-5e1f)",), "550.54.15")


def fake_nvidia(tmp_path, monkeypatch, driver="550.54.15", smi_fails=False):
    """A machine that shows an H200 (a device file, an nvidia-smi that lists it) to the real probes."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):  # only nvidia<N> names a GPU
        (dev / name).touch()
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + ("exit 9\n" if smi_fails else
                   f'case "$1" in -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-5e1f)";; *) echo "{driver}";; esac\n'))
    smi.chmod(0o755)
    monkeypatch.setattr(hardware, "NVIDIA_DEVICE_DIR", dev)
    monkeypatch.setattr(hardware, "NVIDIA_SMI", str(smi))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_the_probes_find_a_gpu_that_cuda_cannot_use(tmp_path, monkeypatch):
    fake_nvidia(tmp_path, monkeypatch)
    assert hardware.probe_nvidia() == hardware.NvidiaDevices((str(tmp_path / "dev" / "nvidia0"),),
                                                             ("GPU 0: NVIDIA H200 (UUID: GPU-5e1f)",), "550.54.15")
    monkeypatch.setattr(hardware, "NVIDIA_SMI", str(tmp_path / "missing"))  # no nvidia-smi: the device file says it
    assert hardware.probe_nvidia() == hardware.NvidiaDevices((str(tmp_path / "dev" / "nvidia0"),))
    monkeypatch.setattr(hardware, "NVIDIA_DEVICE_DIR", tmp_path / "nothing")
    assert not hardware.probe_nvidia().present


@pytest.mark.parametrize("cuda_build,available,seen,expected", [
    ("13.0", False, H200_SEEN, "CUDA 13 builds of torch 2.14.1 and DALI need NVIDIA driver 580 or newer, this "
                               "machine has 550.54.15; update the driver, or (with driver 525 or newer) install the "
                               "CUDA 12.6 builds: pip install torch==2.14.1 torchvision==0.29.1 --index-url "
                               "https://download.pytorch.org/whl/cu126 && pip install -e '.[dali-cuda12]'"),
    ("12.6", False, hardware.NvidiaDevices(("/dev/nvidia0",), (), "470.82.01"),
     "CUDA 12 builds of torch 2.14.1 and DALI need NVIDIA driver 525 or newer, this machine has 470.82.01; "
     "update the driver"),
    ("13.0", False, hardware.NvidiaDevices((), ("GPU 0: NVIDIA H200 (UUID: GPU-5e1f)",), "580.65.06"),
     "its driver (580.65.06) is new enough for CUDA 13, so check that this process may open /dev/nvidia* and what "
     "CUDA_VISIBLE_DEVICES says"),
    ("13.0", True, H200_SEEN, None),  # CUDA works
    (None, False, H200_SEEN, None),  # a CPU build of torch never uses the GPU, by choice
    ("13.0", False, hardware.NvidiaDevices(), None),  # no GPU on this machine
])
def test_which_machines_have_a_gpu_that_this_torch_cannot_use(cuda_build, available, seen, expected, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = hardware.driver_problem(cuda_build, available, seen, "torch 2.14.1+cu130, CUDA 13.0")
    head = (f"{seen} but this torch build (torch 2.14.1+cu130, CUDA 13.0) cannot use it "
            "(torch.cuda.is_available() is false): ")
    assert found == (expected and head + expected)


def test_the_gpu_seen_is_named_by_its_device_file_and_nvidia_smi():
    assert str(H200_SEEN) == "an NVIDIA GPU is present (/dev/nvidia0; nvidia-smi: GPU 0: NVIDIA H200)"
    assert str(hardware.NvidiaDevices(("/dev/nvidia1",))) == "an NVIDIA GPU is present (/dev/nvidia1)"


def test_gpus_hidden_on_purpose_are_no_problem(monkeypatch):
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert hardware.driver_problem("13.0", False, H200_SEEN, "t") is None


needs_cuda_build_without_cuda = pytest.mark.skipif(
    torch.cuda.is_available() or not torch.version.cuda,
    reason="needs a CUDA build of torch on a machine where CUDA is unavailable (the case is faked by the probes)")


@needs_cuda_build_without_cuda
@pytest.mark.parametrize("extra", [[], ["--set=amp=fp16"]])
def test_a_run_that_would_use_the_cpu_beside_a_gpu_stops_with_one_line(extra, tiny_root, tmp_path, monkeypatch,
                                                                        capsys):
    """The real torch build of this machine (CUDA, no usable GPU) beside a GPU the probes find: no recipe trains
    on the CPU silently, and a paper recipe's fp16 is not blamed on a missing GPU; nothing is written."""
    fake_nvidia(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "smoke.yaml", "--output", str(run_dir), *tiny_overrides(tiny_root), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: an NVIDIA GPU is present (")
    assert f"CUDA {torch.version.cuda.split('.')[0]} builds of torch 2.14.1 and DALI need NVIDIA driver" in err[0]
    assert "this machine has 550.54.15" in err[0]
    assert not run_dir.exists()


@needs_cuda_build_without_cuda
def test_env_reports_the_driver_problem(tmp_path, monkeypatch, capsys):
    fake_nvidia(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["env"])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert "GPUs: none usable; an NVIDIA GPU is present (" in out.out and "driver 550.54.15" in out.out
    assert "problem: an NVIDIA GPU is present (" in out.out and "need NVIDIA driver" in out.out
    assert out.err.strip() == "error: 1 GPU problem(s) with this install (listed above)"
    # the same machine with a new enough driver: still reported, with what else to check
    monkeypatch.setattr(hardware, "NVIDIA_DEVICE_DIR", tmp_path / "no-dev")
    fake_smi = tmp_path / "nvidia-smi"
    fake_smi.write_text(fake_smi.read_text().replace("550.54.15", "590.10.01"))
    with pytest.raises(SystemExit):
        main(["env"])
    assert "its driver (590.10.01) is new enough" in capsys.readouterr().out
