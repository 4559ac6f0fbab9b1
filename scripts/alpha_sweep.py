"""The paper's Fig. 8 on the demo set: the same run at PGT alpha 1 (plain), 0.5 and 0.25, then the report.

    python scripts/alpha_sweep.py [--out runs/alpha-sweep] [--epochs 6]

Trains the smoke recipe (resnet10t on the generated 10-class demo set, CPU friendly) three
times with everything equal but loss.pgt_alpha, prints final train loss, train logit norm and
val top-1 per alpha, and writes `powergrad-train report` of the three runs into OUT/report
(alpha.png is the Fig. 8 panel: logit norm and final loss against alpha).
"""

import argparse
import csv
from pathlib import Path

from powergrad_train.cli import main as cli

ALPHAS = ("null", "0.5", "0.25")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/alpha-sweep")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    out = Path(args.out)
    folders = []
    for alpha in ALPHAS:
        folder = out / f"alpha-{'1' if alpha == 'null' else alpha}"
        if not (folder / "last.pt").exists():
            cli(["--config", "smoke.yaml", "--output", str(folder), "--set", f"loss.pgt_alpha={alpha}",
                 "--set", f"schedule.epochs={args.epochs}"])
        folders.append(folder)
    print("| alpha | final train loss | train logit norm | val top-1 |")
    print("|---|---|---|---|")
    for alpha, folder in zip(ALPHAS, folders):
        last = list(csv.DictReader(open(folder / "summary.csv")))[-1]
        print(f"| {'1 (plain)' if alpha == 'null' else alpha} | {float(last['train_loss']):.4f} | "
              f"{float(last['logit_norm']):.2f} | {float(last['eval_top1']):.2f} |")
    cli(["report", *map(str, folders), "--out", str(out / "report")])


if __name__ == "__main__":
    main()
