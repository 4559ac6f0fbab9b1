# A CUDA image for training on GPUs. CUDA selects torch's build and DALI's together:
#   cu130 (default): torch 2.14.1's default CUDA 13.0 wheel + DALI for CUDA 13 (Turing and newer: T4, A100, H100, ...)
#   cu126:           torch 2.14.1's CUDA 12.6 wheel + DALI for CUDA 12 (also Volta: V100)
#   docker build -t powergrad-train .
#   docker build --build-arg CUDA=cu126 -t powergrad-train:v100 .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data/imagenet -v $PWD/runs:/work/runs powergrad-train \
#     torchrun --nproc_per_node=4 -m powergrad_train --config resnet50_pgt.yaml
FROM python:3.11-slim
ARG CUDA=cu130
WORKDIR /work
RUN case "$CUDA" in \
      cu130) pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 ;; \
      cu126) pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126 ;; \
      *) echo "CUDA must be cu130 or cu126, got '$CUDA'" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md ./
COPY powergrad_train ./powergrad_train
COPY scripts ./scripts
RUN if [ "$CUDA" = cu126 ]; then extra=dali-cuda12; else extra=dali; fi; \
    pip install --no-cache-dir -e ".[$extra,prepare]"
ENTRYPOINT []
CMD ["powergrad-train", "env"]
