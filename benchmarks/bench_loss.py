"""PGT loss vs torch cross-entropy, forward + backward, on this machine's CPU (or GPU with --device cuda).

    python benchmarks/bench_loss.py [--n 256] [--c 1000] [--alpha 0.3] [--rounds 7] [--device cpu]

Each round times a block of calls of each loss and takes the median per call (warm-up excluded;
which block runs first alternates between rounds); the ratio printed is the median over rounds,
with its range. Last lines, one per dtype:
    pgt/ce float32: 0.898 [0.846-0.914] (pgt 199.7 us, ce 223.2 us)
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from powergrad_train.pgt import power_grad_cross_entropy


def timed_call(fn, logits, target, device) -> float:
    x = logits.detach().requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x, target).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def per_call(fn, logits, target, calls, device) -> float:
    """Median seconds per call over a block of consecutive calls."""
    return statistics.median(timed_call(fn, logits, target, device) for _ in range(calls))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--c", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"device {args.device} ({torch.get_num_threads()} threads), N={args.n}, C={args.c}, alpha={args.alpha}, "
          f"torch {torch.__version__}")
    ce = lambda x, t: F.cross_entropy(x.float(), t)  # noqa: E731  (autocast would upcast the same way)
    pgt = lambda x, t: power_grad_cross_entropy(x, t, args.alpha)  # noqa: E731
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(args.n, args.c, generator=g) * 3).to(args.device, dtype)
        target = torch.randint(0, args.c, (args.n,), generator=g).to(args.device)
        for fn in (ce, pgt):  # warm-up
            per_call(fn, logits, target, 50, args.device)
        ratios, ce_t, pgt_t = [], [], []
        for r in range(args.rounds):
            order = (ce, pgt) if r % 2 == 0 else (pgt, ce)  # alternate which block runs first
            times = {fn: per_call(fn, logits, target, args.calls, args.device) for fn in order}
            c, q = times[ce], times[pgt]
            ratios.append(q / c)
            ce_t.append(c)
            pgt_t.append(q)
        spread = f"[{min(ratios):.3f}-{max(ratios):.3f}]"
        lines.append(f"pgt/ce {str(dtype).removeprefix('torch.')}: {statistics.median(ratios):.3f} {spread} "
                     f"(pgt {statistics.median(pgt_t) * 1e6:.1f} us, ce {statistics.median(ce_t) * 1e6:.1f} us)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
