"""`log.outputs: [wandb]`: the run in Weights & Biases (pip install -e ".[wandb]").

Offline unless asked otherwise: the mode is WANDB_MODE when it is set, else online when
WANDB_API_KEY is set, else offline (the run is written under <run folder>/wandb/ and sent later
with `wandb sync`). The W&B run id is kept in the checkpoint, so a resumed run continues the same
W&B run. WANDB_PROJECT names the project (default powergrad-train), WANDB_ENTITY the team.
"""

from __future__ import annotations

import os
import sys

from powergrad_train.config.declare import Part
from powergrad_train.system.errors import UserError, printable
from powergrad_train.training.outputs import RunInfo, Tracker

PROJECT = "powergrad-train"


class WandB(Tracker):
    package = "wandb"
    run = None

    def start(self, info: RunInfo) -> None:
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        try:
            # console="off": the run's own lines stay on the terminal as they are, not wrapped by W&B.
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=info.run_dir.name,
                                  dir=str(info.run_dir), mode=mode, config=info.config, id=self.run_id,
                                  resume="allow", settings=wandb.Settings(console="off"))
        except (wandb.Error, OSError, ValueError) as e:
            raise UserError(f"log.outputs: wandb could not start its run ({printable(str(e).splitlines()[0])}); "
                              "WANDB_MODE=offline writes it to the run folder") from None
        self.run_id = self.run.id

    def scalars(self, group: str, step: int, values: dict) -> None:
        self.run.log({f"{group}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if sys.exc_info()[1] is None else 1)  # an error in flight: a failed run
            self.run = None


PART = Part(lambda section: WandB(),
            "Weights & Biases, offline unless WANDB_MODE or WANDB_API_KEY is set; an optional extra")
