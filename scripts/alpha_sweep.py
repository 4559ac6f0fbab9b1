"""The paper's Fig. 8 on the demo set: the same run at PGT alpha 1 (plain), 0.5 and 0.25, then the report.

    python scripts/alpha_sweep.py [--out runs/alpha-sweep] [--epochs 6] [--seeds 0,1] [--alphas null,0.5,0.25]

Trains the smoke recipe (resnet10t on the generated 10-class demo set, CPU friendly) with
everything equal but loss.pgt_alpha (and the seed, once per --seeds), writes `powergrad-train
report` of the runs into OUT/report and prints its comparisons: each two alphas as two arms over
the seeds, with the gain, its interval and verdict, and the seeds needed. alpha.png is the Fig. 8
panel (logit norm and final loss against alpha), and each comparison gets its accuracy and
filter-norm figures (those in docs/ come from `--seeds 0,1 --alphas null,0.25 --epochs 4`).
"""

import argparse
import sys
from pathlib import Path

from powergrad_train.cli import main as cli
from powergrad_train.reproduction.report import build_report, save
from powergrad_train.system.errors import UserError

ALPHAS = ("null", "0.5", "0.25")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/alpha-sweep")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1 (seed 0's folders keep their names)")
    p.add_argument("--alphas", default=",".join(ALPHAS), help="PGT alphas, null for the plain gradient")
    args = p.parse_args()
    out = Path(args.out).absolute()
    folders = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for alpha in args.alphas.split(","):
            folder = out / f"alpha-{'1' if alpha == 'null' else alpha}{f'-seed{seed}' if seed else ''}"
            # --resume auto: a finished run is kept, an interrupted one continues
            cli(["--config", "smoke.yaml", "--output", str(folder), "--resume", "auto", "--set",
                 f"loss.pgt_alpha={alpha}", "--set", f"schedule.epochs={args.epochs}", "--set", f"seed={seed}"])
            folders.append(folder)
    try:
        report = build_report(folders, out / "report")
        figures = save(report, out / "report")
    except UserError as e:  # a report that cannot be written: one line, as the CLI says it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(report.compared))  # the comparisons report.md holds
    print(f"written: {out / 'report' / 'report.md'}" + "".join(f", {f}" for f in figures))


if __name__ == "__main__":
    main()
