"""MLflow tracking: one MLflow run per pipeline run, found again by its run key so that retries reuse it."""

from __future__ import annotations

import logging
import os

from mlflow.tracking import MlflowClient

from kiln.tasks.settings import get_settings

log = logging.getLogger(__name__)

#: Tag that ties an MLflow run to a pipeline run's artifact key.
RUN_KEY_TAG = "kiln.run_key"


def use_s3_endpoint() -> None:
    """Point MLflow's S3 artifact repository at ``KILN_S3_ENDPOINT_URL``, so that an ``s3://`` MLflow artifact
    root can live on the same S3-compatible endpoint as the artifact store.

    MLflow takes its S3 endpoint only from the ``MLFLOW_S3_ENDPOINT_URL`` environment variable, read each time it
    creates an S3 client: this copies kiln's setting there (and so to the processes kiln starts). This is the one
    place kiln sets it; call it before MLflow reads or writes artifacts. An ``MLFLOW_S3_ENDPOINT_URL`` that is
    already set is kept: it was chosen for MLflow explicitly.
    """
    endpoint = get_settings().s3_endpoint_url
    if endpoint:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str) -> str:
    """The id of experiment ``name``, created with artifacts under ``artifact_root/name`` if it does not exist."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    log.info("creating MLflow experiment %s", name)
    return client.create_experiment(name, artifact_location=f"{artifact_root.rstrip('/')}/{name}")


def ensure_run(tracking_uri: str, artifact_root: str, experiment: str, run_key: str,
               tags: dict[str, str] | None = None) -> str:
    """The MLflow run id for ``run_key``: the existing one (a retried task) or a new one.

    Args:
        tracking_uri: MLflow tracking URI.
        artifact_root: where a newly created experiment keeps its artifacts.
        experiment: experiment name (the pipeline name).
        run_key: the pipeline run's artifact key, recorded as a tag.
        tags: extra tags for a new run.
    """
    use_s3_endpoint()  # the validation report and plots logged to this run may go to s3://
    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    run_id = run_of(client, exp_id, run_key)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        log.info("reusing MLflow run %s for %s", run_id, run_key)
        return run_id
    run = client.create_run(exp_id, run_name=run_key.rsplit("/", 1)[-1],
                            tags={RUN_KEY_TAG: run_key, **(tags or {})})
    log.info("created MLflow run %s for %s", run.info.run_id, run_key)
    return run.info.run_id


def find_run(tracking_uri: str, experiment: str, run_key: str) -> str:
    """The MLflow run id of ``run_key``, left as it is (a finished run stays finished).

    Raises:
        LookupError: the pipeline run has no MLflow run (its training step has not run).
    """
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run_id = run_of(client, exp.experiment_id, run_key) if exp else None
    if not run_id:
        raise LookupError(f"no MLflow run of {run_key} in experiment '{experiment}'; run its train step first")
    return run_id


def run_of(client: MlflowClient, experiment_id: str, run_key: str) -> str | None:
    """The id of the run tagged with ``run_key`` in one experiment, if any."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                               max_results=1)
    return found[0].info.run_id if found else None


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark an MLflow run as ended (``FINISHED`` or ``FAILED``)."""
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)
