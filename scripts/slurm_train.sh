#!/usr/bin/env bash
# Launch powergrad-train on N SLURM nodes with torchrun (one torchrun per node, GPUs per node).
#
#   sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=1 --cpus-per-task=32 \
#          scripts/slurm_train.sh --config resnet50_pgt.yaml --set data.root=/data/imagenet
#
# Every argument is passed to powergrad-train. Preemption: SLURM sends SIGTERM before it kills
# the job (ask for a warning with --signal=TERM@120); the trainer writes a checkpoint and stops,
# and a requeued job continues from it because of --resume auto.
#SBATCH --job-name=powergrad
#SBATCH --signal=TERM@120
#SBATCH --requeue
set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-4}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
OUTPUT=${OUTPUT:-runs/slurm-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}

# srun starts one torchrun per node; torchrun starts one process per GPU and forwards SIGTERM.
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" \
  --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_backend=c10d \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  -m powergrad_train --output "$OUTPUT" --resume auto "$@"
