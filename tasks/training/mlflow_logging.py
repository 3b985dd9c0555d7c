"""A training job's MLflow logging: its params and per-epoch metrics, logged from rank 0 as it trains, or relayed
afterwards by the launcher for a job that could not reach the tracking store (containers). Imports mlflow only when
a run id is given, and never torch: a launcher imports this."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kiln.tasks.training.job import TrainConfig


class MlflowLogger:
    """Logs to an existing MLflow run from rank 0; a no-op without a run id. Imports mlflow only when used."""

    def __init__(self, config: TrainConfig, enabled: bool):
        self.run_id = config.mlflow_run_id if enabled else None
        self.client: Any = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=config.mlflow_tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.client:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


#: MLflow's longest param value.
MAX_PARAM_CHARS = 6000


def run_params(config: TrainConfig, world_size: int, fingerprint: str) -> dict[str, Any]:
    """What a job logs as its MLflow run's params. Where it ran (resources, docker) is the launch's business, not
    a training hyperparameter. The user's ``training.params`` are logged one by one (``params.<name>``)."""
    params = {**{f"training.{k}": v for k, v in config.training.model_dump(mode="json").items()
                 if k not in ("resources", "docker", "params")},
              **{f"params.{k}": v for k, v in config.training.params.items()},
              **{f"model.{k}": v for k, v in config.model.model_dump(mode="json").items()},
              "task": config.task, "world_size": world_size, "fingerprint": fingerprint}
    if config.code_hash:
        params["code_hash"] = config.code_hash
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:MAX_PARAM_CHARS]
            for k, v in params.items()}


def relay_to_mlflow(config: TrainConfig, metrics_file: Path) -> int:
    """Log a finished job's params and every epoch of its history to ``config``'s MLflow run, from the process
    that launched it: for a job in containers that were not given the tracking store (a file-based store lives in
    kiln's home folder, which containers must not mount). Returns the number of epochs logged."""
    done = json.loads(Path(metrics_file).read_text())
    logger = MlflowLogger(config, enabled=True)
    logger.log_params(run_params(config, done["world_size"], done["fingerprint"]))  # the same values: allowed again
    for entry in done["history"]:
        logger.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])
    return len(done["history"])
