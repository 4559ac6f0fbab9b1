#!/usr/bin/env bash
# The prepared check of the GPU path, for a borrowed GPU machine (no network, torch preinstalled), in
# parts of at most 5 minutes each on one H200. Each part writes its summary, small text (settings and one
# PASS / FAIL / SKIP line per check), to $OUT/part<N>-<name>.txt when it ends, so any part can be rerun alone:
#   bash gpu_check/gpu_check.sh                  # every part, in order
#   bash gpu_check/gpu_check.sh 1 5              # parts 1 and 5 only
#   OUT=/data/check DALI_WHEELS=/data/wheels bash gpu_check/gpu_check.sh
# Parts: 0 machine (GPU, driver, versions, powergrad-train env), 1 dali (DALI on the GPU end to end),
# 2 fp16 (steps the GradScaler skips leave no trace), 3 checkpoint (SIGTERM mid-epoch and --resume auto),
# 4 ddp (a BN model, 2 processes on one GPU), 5 step (trainer vs bare loop eager, PGT vs cross-entropy),
# 6 compiled (the same compiled), 7 memory (peak of every paper model at 256 images per GPU, DALI's too).
# DALI is rarely on a GPU image: put the wheel of nvidia-dali-cuda130 2.4.0 (cuda120 for a CUDA 12 torch)
# and those its metadata requires that the image lacks (typically nvidia-nvimgcodec-cu13, nvidia-nvjpeg,
# optree, gast, astunparse) in a folder and name it in DALI_WHEELS: gpu_check/gpu_check_install.py unpacks
# them into site-packages first. Without DALI the DALI steps skip (parts 3 and 4 read with torchvision).
# Runs never meet an earlier run's folders (each gets a fresh one under $OUT/work); the generated JPEGs
# under $OUT/data are reused. Without a CUDA GPU every part runs what it can at small sizes and prints one
# SKIP line per step it cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
export OUT PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export POWERGRAD_TRAIN_CACHE=${POWERGRAD_TRAIN_CACHE:-$OUT/cache}
mkdir -p "$OUT"
GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
PARTS=${*:-0 1 2 3 4 5 6 7}

run() {  # run COMMAND...: echo it, run it, remember a failure
  echo "\$ $*"
  "$@" || failed=1
}

part0() {
  if command -v nvidia-smi > /dev/null; then
    run nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  else
    echo "SKIP: nvidia-smi (not on this machine)"
  fi
  run python3 -c "import platform, torch, timm; print('Python', platform.python_version(), '| torch', torch.__version__,
    '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version(), '| timm', timm.__version__)"
  cat "$OUT/install.txt"
  run python3 -m powergrad_train env
}

part1() { run python3 gpu_check/gpu_check_dali.py; }
part2() { run python3 gpu_check/gpu_check_fp16.py; }
part3() { run python3 gpu_check/gpu_check_resume.py; }
part4() { run python3 gpu_check/gpu_check_ddp.py; }

part5() {
  if [ "$GPU" = 1 ]; then
    for amp in fp16 bf16; do
      run python3 benchmarks/bench_step.py --device cuda --model resnet50 --image-size 224 --batch 256 --amp $amp \
        --channels-last --steps 15 --rounds 3
    done
    run python3 benchmarks/bench_loss.py --device cuda --rounds 5 --calls 200
    run python3 -m powergrad_train bench --config resnet50_pgt.yaml --data synthetic --set data.batch_size=256 --steps 30
  else
    echo "SKIP: resnet50 at 224 px, batch 256, fp16 and bf16 on the GPU (no CUDA GPU here): the same scripts run small"
    run python3 benchmarks/bench_step.py --model resnet10t --batch 16 --steps 3 --warmup 1 --rounds 1
    run python3 benchmarks/bench_loss.py --rounds 1 --calls 20
  fi
}

part6() {
  if [ "$GPU" = 1 ]; then
    run python3 benchmarks/bench_step.py --device cuda --model resnet50 --image-size 224 --batch 256 --amp bf16 \
      --channels-last --compile --steps 15 --rounds 3
  else
    echo "SKIP: the compiled step's speed (no CUDA GPU here); the compiled update is checked below, small"
  fi
  run python3 gpu_check/gpu_check_compile.py
}

part7() {
  if [ "$GPU" = 1 ]; then  # DALI's memory on part 1's JPEGs when they are there (else on JPEGs made for it)
    run python3 benchmarks/estimate_memory.py --batch 256 $([ -d "$OUT/data/jpegs-1000-50" ] && echo --data "$OUT/data/jpegs-1000-50")
  else
    run python3 benchmarks/estimate_memory.py --models resnet18,resnet18_nobn --image-size 112
  fi
}

NAMES=(machine dali fp16 checkpoint ddp step compiled memory)
status=0
echo "gpu check: parts $PARTS; summaries in $OUT"
run python3 gpu_check/gpu_check_install.py > "$OUT/install.txt" 2>&1 || true
tail -n 1 "$OUT/install.txt"
for n in $PARTS; do
  name=${NAMES[$n]:?no part $n}
  summary="$OUT/part$n-$name.txt"
  echo "== part $n: $name"
  failed=0
  { "part$n"; echo "part $n ($name): $([ $failed = 0 ] && echo 'no check failed' || echo 'FAILED')"; } 2>&1 \
    | tee "$summary.partial"
  grep -q "^part $n ($name): no check failed" "$summary.partial" || status=1
  mv "$summary.partial" "$summary"  # written whole when the part ends
done
exit $status
