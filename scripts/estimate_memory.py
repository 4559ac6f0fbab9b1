"""Estimated GPU memory of the paper's models at 256 images per GPU (fp16, channels_last), without a GPU.

    python scripts/estimate_memory.py [--batch 256] [--image-size 224]

Runs on the CPU and counts what training keeps in memory:
  - per parameter: float32 weight, gradient and momentum buffer (12 bytes);
  - the tensors autograd saves for the backward pass at the given batch, measured with
    torch's saved-tensor hooks (unique storages) under bf16 autocast, which stores the same
    2 bytes per value as fp16, at batches 2 and 4 and extrapolated linearly (activations grow
    with the batch, casted weight copies do not).
The GPU peak is higher: the backward pass's transient buffers, cuDNN workspaces and the
allocator's rounding, plus the CUDA context outside torch's count. "fits" below keeps a
margin of 25% + 1.5 GiB for those. These are estimates; on a GPU measure with
torch.cuda.max_memory_allocated (scripts/gpu_check.sh).
"""

import argparse

import timm
import torch

import powergrad_train.models  # noqa: F401  (registers resnet18_nobn with timm)

MODELS = ["resnet18", "resnet18_nobn", "seresnet18", "resnet50", "seresnet50", "resnet101"]
GIB = 2 ** 30


def saved_bytes(model, batch: int, image_size: int) -> int:
    storages = {}

    def pack(t):
        if t.device.type == "cpu" and t.numel():
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    images = torch.randn(batch, 3, image_size, image_size).to(memory_format=torch.channels_last)
    targets = torch.zeros(batch, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def fits(total: int, gib: int) -> bool:
    return total * 1.25 + 1.5 * GIB <= gib * GIB


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256, help="images per GPU (default 256)")
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"estimate at {args.batch} images per GPU, {args.image_size} px, fp16 activations, channels_last")
    print("| model | parameters | weights+grads+momentum | activations | total | 16 GB V100 | 32 GB V100 |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        model = timm.create_model(name, num_classes=1000).to(memory_format=torch.channels_last).train()
        params = sum(p.numel() for p in model.parameters())
        a2, a4 = saved_bytes(model, 2, args.image_size), saved_bytes(model, 4, args.image_size)
        activations = a2 + (a4 - a2) / 2 * (args.batch - 2)
        states = 12 * params
        total = states + activations
        verdict = []
        for gib in (16, 32):
            if fits(total, gib):
                verdict.append("fits")
            else:  # the smallest power-of-two accumulation that fits
                k = 2
                while not fits(states + activations / k, gib) and k < args.batch:
                    k *= 2
                verdict.append(f"train.accumulate_steps: {k}")
        print(f"| {name} | {params / 1e6:.1f} M | {states / GIB:.2f} GiB | {activations / GIB:.1f} GiB | "
              f"{total / GIB:.1f} GiB | {verdict[0]} | {verdict[1]} |")


if __name__ == "__main__":
    main()
