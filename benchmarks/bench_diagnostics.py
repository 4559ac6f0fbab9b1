"""What the paper's diagnostics cost: the end-of-epoch filter norms, and the pooled-feature watch
during evaluation.

    python benchmarks/bench_diagnostics.py [--model resnet50] [--device cpu]

Prints the time of one `epoch_diagnostics` call (per-filter norms of every convolution, written
as a compressed array file) and the eval forward pass with and without the feature watch,
medians over rounds:
    epoch diagnostics 41.0 ms once per epoch; eval batch 212.3 ms, with the watch 212.9 ms (+0.3%)
"""

import argparse
import statistics
import tempfile
import time

import timm
import torch

from powergrad_train.training.diagnostics import PooledFeatureWatch, epoch_diagnostics


def median_ms(fn, device, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    device = torch.device(args.device)
    model = timm.create_model(args.model, num_classes=1000).to(device).eval()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    watch = PooledFeatureWatch(model)

    def forward():
        with torch.no_grad():
            model(images)

    def watched():
        watch.start()
        forward()
        watch.dead_channels()
        return watch.channel_rms()

    rms = watched()
    with tempfile.TemporaryDirectory() as run_dir:
        diag = median_ms(lambda: epoch_diagnostics(model, run_dir, 1, True, rms), device, args.rounds)
    forward()
    plain = median_ms(forward, device, args.rounds)
    with_watch = median_ms(watched, device, args.rounds)
    print(f"{args.device}, {torch.get_num_threads()} threads; {args.model}, eval batch {args.batch} at "
          f"{args.image_size} px; torch {torch.__version__}; medians of {args.rounds} rounds")
    print(f"epoch diagnostics {diag:.1f} ms once per epoch; eval batch {plain:.1f} ms, with the watch "
          f"{with_watch:.1f} ms ({100 * (with_watch / plain - 1):+.1f}%)")


if __name__ == "__main__":
    main()
