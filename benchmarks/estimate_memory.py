"""GPU memory of the paper's models at 256 images per GPU (fp16, channels_last): estimated on any
machine, measured on a GPU.

    python benchmarks/estimate_memory.py [--batch 256] [--image-size 224] [--data DIR] [--models resnet18,...]

The estimate runs on the CPU and counts what training keeps in memory:
  - per parameter: float32 weight, gradient and momentum buffer (12 bytes);
  - the tensors autograd saves for the backward pass at the given batch, measured with
    torch's saved-tensor hooks (unique storages) under bf16 autocast, which stores the same
    2 bytes per value as fp16, at batches 2 and 4 and extrapolated linearly (activations grow
    with the batch, casted weight copies do not).
The GPU peak is higher: the backward pass's transient buffers, cuDNN workspaces and the
allocator's rounding, plus the CUDA context outside torch's count. "fits" below keeps a
margin of 25% + 1.5 GiB for those.

On a machine with a CUDA GPU it then measures, on that GPU: torch's peak (max_memory_reserved
over three training steps of the real trainer, PGT on, synthetic data), the DALI train pipeline
of the paper recipe at this batch (`dali.measure_gpu_memory`: pool, prefetch queues, decoded
images, which torch's statistics cannot see) on ImageNet-like JPEGs (--data, or a generated
folder of 500x375 JPEGs), and the CUDA context; their sum is what the run needs on that GPU.
On a CPU-only machine the measured table says it was not measured.
"""

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import timm
import torch

import powergrad_train.training.models  # noqa: F401  (registers resnet18_nobn with timm)

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


def estimate(models, batch: int, image_size: int) -> None:
    print(f"estimate at {batch} images per GPU, {image_size} px, fp16 activations, channels_last (on the CPU)")
    print("| model | parameters | weights+grads+momentum | activations | total | 16 GB V100 | 32 GB V100 |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        model = timm.create_model(name, num_classes=1000).to(memory_format=torch.channels_last).train()
        params = sum(p.numel() for p in model.parameters())
        a2, a4 = saved_bytes(model, 2, image_size), saved_bytes(model, 4, image_size)
        activations = a2 + (a4 - a2) / 2 * (batch - 2)
        states = 12 * params
        total = states + activations
        verdict = []
        for gib in (16, 32):
            if fits(total, gib):
                verdict.append("fits")
            else:  # the smallest power-of-two accumulation that fits
                k = 2
                while not fits(states + activations / k, gib) and k < batch:
                    k *= 2
                verdict.append(f"train.accumulate_steps: {k}")
        print(f"| {name} | {params / 1e6:.1f} M | {states / GIB:.2f} GiB | {activations / GIB:.1f} GiB | "
              f"{total / GIB:.1f} GiB | {verdict[0]} | {verdict[1]} |")


def torch_peak(name: str, batch: int, image_size: int, device: torch.device) -> tuple[int, int]:
    """(peak allocated, peak reserved) bytes over three steps of the real trainer on synthetic data."""
    from powergrad_train.config.build import build_config
    from powergrad_train.system.dist import DistEnv
    from powergrad_train.training.run import build_run

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    cfg = build_config("imagenet.yaml", [f"model.name={name}", "data.backend=synthetic", f"data.batch_size={batch}",
                                         f"data.image_size={image_size}", "loss.pgt_alpha=0.25"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_run(cfg, Path(run_dir), DistEnv(), device)
        try:
            trainer.model.train()
            images, targets = next(iter(trainer.data.train))
            for _ in range(3):
                trainer.train_step(images, targets)
            torch.cuda.synchronize(device)
        finally:
            trainer.close()
    peak = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    del trainer, images, targets
    gc.collect()  # the trainer's parts refer to each other
    torch.cuda.empty_cache()
    return peak


def dali_bytes(batch: int, image_size: int, data: Path, device: torch.device) -> int:
    """The paper recipe's DALI pipelines (train on the GPU; val with torchvision) at this batch."""
    from powergrad_train.config.build import build_config
    from powergrad_train.data import read_split
    from powergrad_train.data.dali import measure_gpu_memory

    cfg = build_config("imagenet.yaml", [f"data.root={data}", f"data.batch_size={batch}",
                                         f"data.image_size={image_size}", "data.dali_device=gpu"]).data
    return measure_gpu_memory(cfg, read_split(cfg, "train").samples, read_split(cfg, "val").samples, device)


def measure(models, batch: int, image_size: int, data: Path) -> None:
    from powergrad_train.system.errors import ConfigError

    device = torch.device("cuda", torch.cuda.current_device())
    torch.zeros(1, device=device)  # the CUDA context exists from here on
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    try:
        dali = dali_bytes(batch, image_size, data, device)
        dali_text = f"the DALI train pipeline ({dali / GIB:.2f} GiB, measured on {data})"
    except ConfigError as e:  # DALI is not installed
        dali, dali_text = 0, f"no DALI pipeline ({e})"
    print(f"\nmeasured on {torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB) at {batch} images per GPU, "
          f"{image_size} px, fp16, channels_last: torch's peak over 3 trainer steps + {dali_text} + CUDA context "
          f"and other processes ({context / GIB:.2f} GiB)")
    print("| model | torch peak allocated | torch peak reserved | + DALI + context | 16 GiB | 32 GiB |")
    print("|---|---|---|---|---|---|")
    for name in models:
        allocated, reserved = torch_peak(name, batch, image_size, device)
        need = reserved + dali + context
        verdict = ["fits" if need <= gib * GIB else "does not fit" for gib in (16, 32)]
        print(f"| {name} | {allocated / GIB:.2f} GiB | {reserved / GIB:.2f} GiB | {need / GIB:.2f} GiB | "
              f"{verdict[0]} | {verdict[1]} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="images per GPU (default 256)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: the paper's models)")
    p.add_argument("--data", type=Path, help="on a GPU: ImageFolder root for the DALI measurement "
                                             "(default: generate 500x375 JPEGs into a temporary folder)")
    args = p.parse_args()
    models = args.models.split(",")
    torch.manual_seed(0)
    estimate(models, args.batch, args.image_size)
    if not torch.cuda.is_available():
        print("\nmeasured: not on this machine (no CUDA GPU); on a GPU this script also measures torch's peak, "
              "the DALI pipelines and the CUDA context")
        return
    with tempfile.TemporaryDirectory(prefix="estimate-memory-") as tmp:
        data = args.data
        if data is None:
            sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
            from make_jpeg_folder import make_folder
            per_class = -(-4 * args.batch // 10)  # 4 batches over the 10 classes
            data = make_folder(Path(tmp) / "jpegs", train=per_class, val=per_class // 4)
        measure(models, args.batch, args.image_size, data)


if __name__ == "__main__":
    main()
