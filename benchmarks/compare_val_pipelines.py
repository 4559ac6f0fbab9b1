"""How far DALI's val resize and PIL's (the paper's validation) differ in top-1, on the demo set.

    python benchmarks/compare_val_pipelines.py [--epochs 6]

Trains the smoke recipe through the DALI CPU pipeline into a temporary folder, then evaluates
that one checkpoint on the demo val split (300 images) four ways: DALI or PIL (torchvision)
resize + center crop, each with bilinear and bicubic interpolation. Prints one line per way:
    dali        bilinear  top1 81.33  top5 99.00  loss 0.5533
"""

import argparse
import tempfile
from pathlib import Path

import torch

from powergrad_train.cli import main as cli
from powergrad_train.config.build import build_config
from powergrad_train.data import build_val_loader
from powergrad_train.training import checkpoint
from powergrad_train.training.engine import autocast_for, evaluate_model
from powergrad_train.training.models import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cli(["--config", "smoke.yaml", "--output", str(run), "--set", "data.backend=dali",
             "--set", "data.dali_device=cpu", "--set", f"schedule.epochs={args.epochs}"])
        state = checkpoint.load(run / "last.pt")
        print(f"checkpoint after {state['train_state']['epoch']} epochs of the smoke recipe (DALI CPU training)")
        for backend in ("dali", "torchvision"):
            for interpolation in ("bilinear", "bicubic"):
                cfg = build_config(None, [f"data.backend={backend}", "data.dali_device=cpu",
                                          f"data.val_interpolation={interpolation}"],
                                   start=("checkpoint", state["config"]))
                model = build_model(cfg.model)
                model.load_state_dict(state["model"])
                loader, _ = build_val_loader(cfg.data, 0, 1)
                v = evaluate_model(model, loader, torch.device("cpu"), autocast_for("off", torch.device("cpu")))
                loader.close()
                print(f"{backend:11s} {interpolation:9s} top1 {v['top1']:.2f}  top5 {v['top5']:.2f}  "
                      f"loss {v['loss']:.4f}")


if __name__ == "__main__":
    main()
