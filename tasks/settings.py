"""The one place that reads environment variables (torchrun's rank variables excepted, in ``tasks.train``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    """Where the platform keeps its state. Every field has an embedded default under ``var/``."""

    home: Path
    """``KILN_HOME``: root of all local state (default ``<repo>/var``)."""
    artifact_root: Path | str
    """``KILN_ARTIFACT_ROOT``: the artifact store: a local folder (a resolved ``Path``, default
    ``$KILN_HOME/artifacts``) or an ``s3://bucket/prefix`` URI (kept as a ``str``)."""
    s3_endpoint_url: str | None
    """``KILN_S3_ENDPOINT_URL``: the endpoint of an S3-compatible store (MinIO, Ceph, a local test server) for an
    ``s3://`` artifact root. Unset: AWS's own endpoint for the region of the standard AWS configuration."""
    mlflow_tracking_uri: str
    """``KILN_MLFLOW_TRACKING_URI``: MLflow tracking + registry (default SQLite under ``$KILN_HOME``)."""
    mlflow_artifact_root: str
    """``KILN_MLFLOW_ARTIFACT_ROOT``: where new MLflow experiments keep artifacts."""
    pipelines_dir: Path
    """``KILN_PIPELINES_DIR``: the folder of pipeline spec files (default ``<repo>/dags/pipelines``)."""
    pools_file: Path | None
    """``KILN_POOLS_FILE``: the resource-pool inventory (YAML). Unset: one pool ``local`` with this machine's
    CPUs, memory and GPUs, discovered at run time."""
    pools_db_url: str
    """``KILN_POOLS_DB_URL``: SQLAlchemy URL of the lease store (default SQLite under ``$KILN_HOME``; production:
    ``postgresql+psycopg2://user:pw@host/db``)."""
    train_image: str
    """``KILN_TRAIN_IMAGE``: the image the Docker launcher runs when a spec names none (``make image`` builds it)."""
    serving_dir: Path
    """``KILN_SERVING_DIR``: per-model deployment files, bundle caches, server logs and pid files (default
    ``$KILN_HOME/serving``)."""
    serve_host: str
    """``KILN_SERVE_HOST``: the address the model server listens on (default ``127.0.0.1``)."""
    serve_port: int
    """``KILN_SERVE_PORT``: the port of the model server the deploy step starts or reloads (default 8765)."""
    serve_token: str | None
    """``KILN_SERVE_TOKEN``: bearer token of the model server's predict and admin endpoints. Unset: a random token
    is generated once into ``$KILN_SERVING_DIR/token`` (mode 0600)."""


def get_settings() -> Settings:
    """Read the settings from the environment now (not cached, so tests may change the environment)."""
    home = Path(os.environ.get("KILN_HOME") or REPO_ROOT / "var").resolve()
    return Settings(
        home=home,
        artifact_root=_artifact_root(os.environ.get("KILN_ARTIFACT_ROOT") or str(home / "artifacts")),
        s3_endpoint_url=os.environ.get("KILN_S3_ENDPOINT_URL") or None,
        mlflow_tracking_uri=os.environ.get("KILN_MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
        mlflow_artifact_root=os.environ.get("KILN_MLFLOW_ARTIFACT_ROOT") or (home / "mlartifacts").as_uri(),
        pipelines_dir=Path(os.environ.get("KILN_PIPELINES_DIR") or REPO_ROOT / "dags" / "pipelines").resolve(),
        pools_file=Path(os.environ["KILN_POOLS_FILE"]).resolve() if os.environ.get("KILN_POOLS_FILE") else None,
        pools_db_url=os.environ.get("KILN_POOLS_DB_URL") or f"sqlite:///{home / 'pools.db'}",
        train_image=os.environ.get("KILN_TRAIN_IMAGE") or "kiln-train:cpu",
        serving_dir=Path(os.environ.get("KILN_SERVING_DIR") or home / "serving").resolve(),
        serve_host=os.environ.get("KILN_SERVE_HOST") or "127.0.0.1",
        serve_port=_int_env("KILN_SERVE_PORT", 8765),
        serve_token=os.environ.get("KILN_SERVE_TOKEN") or None,
    )


def _artifact_root(raw: str) -> Path | str:
    # A URI names a remote store and must not be resolved against the working directory like a path.
    return raw if "://" in raw else Path(raw).resolve()


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, found {raw!r}") from None
