"""`log.outputs: [mlflow]`: the run in MLflow (pip install -e ".[mlflow]").

The tracking store is MLFLOW_TRACKING_URI when it is set, else a file store in the run folder
(<run folder>/mlruns; `mlflow ui --backend-store-uri <run folder>/mlruns` shows it). The
experiment is MLFLOW_EXPERIMENT_NAME, else the run folder's name. Params: the resolved config as
dotted keys; metrics: each epoch's row (epoch/<column>), the progress records (train/loss, top1,
lr) and the other series, at their optimizer step; when the run finishes, its final checkpoint
(best.pt, else last.pt) as an artifact. The MLflow run id is kept in the checkpoint, so a resumed
run continues the same MLflow run.
"""

from __future__ import annotations

import os
import sys
import time

from powergrad_train.config.declare import Part
from powergrad_train.system.errors import UserError, printable
from powergrad_train.training.outputs import RunInfo, Tracker


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{dotted key: value as text} of a nested config."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flat_params(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class MLflow(Tracker):
    package = "mlflow"
    client = None

    def start(self, info: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        self.run_dir = info.run_dir
        try:
            self.client = _client(os.environ.get("MLFLOW_TRACKING_URI") or f"file:{info.run_dir.resolve()}/mlruns")
            if self.run_id is not None:
                self.client.update_run(self.run_id, status="RUNNING")  # a resume continues the run
                return
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or info.run_dir.name
            experiment = self.client.get_experiment_by_name(name)
            run = self.client.create_run(experiment.experiment_id if experiment else self.client.create_experiment(name),
                                         run_name=info.run_dir.name)
            self.run_id = run.info.run_id
            # MLflow bounds a param's length; a longer value (a long list) is cut to it.
            self.client.log_batch(self.run_id, params=[Param(k, v[:MAX_PARAM_VAL_LENGTH])
                                                       for k, v in flat_params(info.config).items()])
        except MlflowException as e:
            raise UserError(f"log.outputs: mlflow could not start its run ({printable(str(e).splitlines()[0])})") \
                from None

    def scalars(self, group: str, step: int, values: dict) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{group}/{k}", float(v), now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        if self.client is None:
            return
        error = sys.exc_info()[1]
        if error is None:
            final = next((p for p in (self.run_dir / "best.pt", self.run_dir / "last.pt") if p.exists()), None)
            if final is not None:
                self.client.log_artifact(self.run_id, str(final))
        # Stopped by a signal (and resumable) or by an error.
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, (SystemExit, KeyboardInterrupt)) else "FAILED"
        self.client.set_terminated(self.run_id, status)
        self.client = None


def _client(uri: str):
    """An MlflowClient for `uri`. MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is
    set (mlflow-skinny has no database store): it is allowed for the making of this client, whose
    store MLflow then keeps, and the process environment is left as it was."""
    from mlflow.tracking import MlflowClient
    if "MLFLOW_ALLOW_FILE_STORE" in os.environ or not uri.startswith("file:"):
        return MlflowClient(uri)
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        return MlflowClient(uri)
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


PART = Part(lambda section: MLflow(), "MLflow: MLFLOW_TRACKING_URI or a store in the run folder; an optional extra")
