#!/usr/bin/env bash
# One prepared check of the GPU path, for a borrowed GPU machine (no network, torch preinstalled):
#   bash scripts/gpu_check.sh [OUT_DIR]
# PGT gradients on CUDA in fp32/fp16/bf16 against float64, the loss cost against cross-entropy,
# the trainer step against a bare loop (resnet50, AMP, channels_last, batch 256, synthetic data,
# eager and torch.compile), the bench command, and a short fp16 training run on the demo set.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 POWERGRAD_TRAIN_CACHE=/tmp/powergrad-cache
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"; nvidia-smi -L; python3 -c "import sys, torch, timm; print(sys.version.split()[0], torch.__version__, timm.__version__, torch.cuda.get_device_name(0))"
python3 -c "import nvidia.dali" 2>/dev/null && echo "DALI present" || echo "DALI not installed here: the gpu placement is not checked"

echo "== PGT gradient on CUDA vs float64 formula"
python3 - <<'PY'
import torch, torch.nn.functional as F
from powergrad_train.pgt import power_grad_cross_entropy
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for alpha, eps in ((0.05, 0.0), (0.3, 0.1), (1.0, 0.1)):
        g = torch.Generator(device="cuda").manual_seed(0)
        z = (torch.randn(256, 1000, device="cuda", generator=g) * 4).to(dtype).requires_grad_()
        t = torch.randint(0, 1000, (256,), device="cuda", generator=g)
        (power_grad_cross_entropy(z, t, alpha, eps) * 65536.0).backward()
        zd = z.detach().double()
        q = torch.full_like(zd, eps / 1000); q[torch.arange(256), t] += 1 - eps
        ref = 65536.0 * (torch.softmax(alpha * zd, 1) - q) / 256
        rel = ((z.grad.double() - ref).norm() / ref.norm()).item()
        print(f"{str(dtype):15s} alpha {alpha:4} eps {eps}: rel err {rel:.2e}, grad dtype {z.grad.dtype}")
PY

echo "== loss cost (CUDA)"; python3 scripts/bench_loss.py --device cuda --rounds 5 --calls 200
echo "== trainer step vs bare loop, resnet50 224px batch 256 bf16 channels_last (eager)"
python3 scripts/bench_step.py --device cuda --model resnet50 --image-size 224 --batch 256 --amp bf16 --channels-last --steps 15 --rounds 5
echo "== same, fp16 (GradScaler)"
python3 scripts/bench_step.py --device cuda --model resnet50 --image-size 224 --batch 256 --amp fp16 --channels-last --steps 15 --rounds 3
echo "== same, bf16 with torch.compile"
python3 scripts/bench_step.py --device cuda --model resnet50 --image-size 224 --batch 256 --amp bf16 --channels-last --compile --steps 15 --rounds 3
echo "== bench command (recipe resnet50_pgt.yaml, synthetic data)"
python3 -m powergrad_train bench --config resnet50_pgt.yaml --data synthetic --set data.batch_size=256 --steps 30
echo "== short fp16 training run on the demo set (GPU, torchvision loader)"
python3 -m powergrad_train --config smoke.yaml --output /tmp/gpu_smoke --set amp=fp16 --set channels_last=true --set data.workers=8 --set schedule.epochs=6
echo "== compiled vs eager step on CUDA (one step, same init)"
python3 - <<'PY'
import tempfile, torch
from pathlib import Path
from powergrad_train.config import build_config
from powergrad_train.dist import DistEnv
from powergrad_train.engine import Trainer
ov = ["model.name=resnet50", "data.backend=synthetic", "data.batch_size=64", "data.image_size=64", "amp=bf16",
      "loss.pgt_alpha=0.3", "schedule.epochs=10", "schedule.warmup_epochs=0", "schedule.cooldown_epochs=0"]
ts = [Trainer(build_config("smoke.yaml", ov + [f"model.compile={c}"]), Path(tempfile.mkdtemp()), DistEnv(), torch.device("cuda")) for c in (False, True)]
x, y = next(iter(ts[0].train_loader))
for t in ts:
    t.train_model.train(); t.train_step(x, y)
err = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(ts[0].model.parameters(), ts[1].model.parameters()))
print(f"compiled vs eager after one bf16 step: max relative parameter difference {err:.2e}")
PY
echo "== install check (powergrad-train env)"; python3 -m powergrad_train env
echo "== peak memory at 256 images per GPU, fp16, channels_last (compare: scripts/estimate_memory.py)"
python3 - <<'PY'
import torch, timm
import powergrad_train.models  # noqa: F401
from powergrad_train.pgt import power_grad_cross_entropy
for name in ["resnet18", "resnet18_nobn", "seresnet18", "resnet50", "seresnet50", "resnet101"]:
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    m = timm.create_model(name, num_classes=1000).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(256, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (256,), device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = power_grad_cross_entropy(m(x), y, 0.25)
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    print(f"{name}: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")
    del m, opt, x
PY
echo "== done"
