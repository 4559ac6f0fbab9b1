# A CUDA image for training on GPUs: torch 2.14.1 (a CUDA 13 build) and DALI for CUDA 13.
#   docker build -t powergrad-train .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data/imagenet -v $PWD/runs:/work/runs powergrad-train \
#     torchrun --nproc_per_node=4 -m powergrad_train --config resnet50_pgt.yaml
FROM python:3.11-slim
WORKDIR /work
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY powergrad_train ./powergrad_train
RUN pip install --no-cache-dir -e ".[dali]"
ENTRYPOINT []
CMD ["powergrad-train", "--help"]
