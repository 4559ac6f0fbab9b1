"""Every name a recipe can pick, and where its implementation lives.

Each table maps a config value to `module:attribute`, imported only when that name is picked
(DALI, TensorBoard or timm's LAMB need not be installed or loaded for a run that does not use
them). The config schema takes its choices from these tables, so adding a loss, an optimizer,
an LR schedule, a batch transform, an output or a data backend is one entry here plus its implementation; each
implementation satisfies the Protocol its table names.
"""

from __future__ import annotations

import importlib

# data.backend -> a data.Backend (powergrad_train/data/__init__.py)
DATA_BACKENDS = {
    "torchvision": "powergrad_train.data.imagefolder:BACKEND",
    "dali": "powergrad_train.data.dali:BACKEND",
    "synthetic": "powergrad_train.data.synthetic:BACKEND",
}

# loss.name -> an objectives.Objective class, built from the loss section
OBJECTIVES = {
    "cross_entropy": "powergrad_train.training.objectives:CrossEntropy",
}

# batch_transform.name -> a batch_transforms.BatchTransform class
BATCH_TRANSFORMS = {
    "none": "powergrad_train.training.batch_transforms:NoTransform",
    "mixup": "powergrad_train.training.batch_transforms:MixupOnly",
    "cutmix": "powergrad_train.training.batch_transforms:CutmixOnly",
    "mixup_cutmix": "powergrad_train.training.batch_transforms:MixupCutmix",
}

# optim.name -> an optim.OptimizerBuilder: the optimizer and how it skips a bad step
OPTIMIZERS = {
    "sgd": "powergrad_train.training.optim:sgd",
    "adamw": "powergrad_train.training.optim:adamw",
    "lamb": "powergrad_train.training.optim:lamb",
}

# schedule.name -> a schedules.Schedule: the LR decay between warmup and cooldown
SCHEDULES = {
    "cosine": "powergrad_train.training.schedules:cosine",
    "step": "powergrad_train.training.schedules:step",
    "multistep": "powergrad_train.training.schedules:multistep",
    "linear": "powergrad_train.training.schedules:linear",
}

# log.outputs entries -> a metrics.Output class (rank 0 only)
OUTPUTS = {
    "console": "powergrad_train.training.metrics:Console",
    "csv": "powergrad_train.training.metrics:SummaryCsv",
    "tensorboard": "powergrad_train.training.metrics:TensorBoard",
    "jsonl": "powergrad_train.training.metrics:JsonLines",
    "wandb": "powergrad_train.training.outputs_wandb:WandB",  # pip install -e ".[wandb]"
    "mlflow": "powergrad_train.training.outputs_mlflow:MLflow",  # pip install -e ".[mlflow]"
}


def load(table: dict[str, str], name: str):
    """The implementation registered under `name` in `table`."""
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)
