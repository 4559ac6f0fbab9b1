"""The training step itself: compiled equals eager, the bench command measures it."""

import torch

from powergrad_train.cli import main
from powergrad_train.config import build_config
from powergrad_train.dist import DistEnv
from powergrad_train.engine import Trainer
from tests.conftest import tiny_overrides


def trainer(root, tmp_path, *extra):
    overrides = [o.removeprefix("--set=") for o in tiny_overrides(root, **{"loss.pgt_alpha": 0.25})]
    return Trainer(build_config("smoke.yaml", overrides + list(extra)), tmp_path, DistEnv(), torch.device("cpu"))


def test_compiled_step_matches_eager(tiny_root, tmp_path):
    eager = trainer(tiny_root, tmp_path / "e")
    compiled = trainer(tiny_root, tmp_path / "c", "model.compile=true")
    images, targets = next(iter(eager.train_loader))
    for t in (eager, compiled):
        t.train_model.train()
        t.train_step(images, targets)
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    eager.close()
    compiled.close()


def test_bench_command_prints_its_figures(tiny_root, capsys):
    main(["bench", "--config", "smoke.yaml", "--steps", "3", "--warmup", "1",
          *tiny_overrides(tiny_root)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("bench: cpu") and "model resnet10t" in out[0] and "data synthetic" in out[0]
    assert out[-1].startswith("training step with data: ") and float(out[-1].split()[-2]) > 0
    main(["bench", "--config", "smoke.yaml", "--steps", "3", "--warmup", "1", "--data", "real",
          *tiny_overrides(tiny_root)])
    assert "data torchvision" in capsys.readouterr().out
