"""The one place that reads environment variables (torchrun's rank variables excepted, in
``kiln.tasks.training.loop``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

REPO_ROOT = Path(__file__).resolve().parents[1]

#: What runs a bundle's model in a model server: ``onnx`` (ONNX Runtime on the bundle's ``model.onnx``), ``torch``
#: (the exported program ``model.pt2``), or ``auto`` (ONNX Runtime when the bundle has ``model.onnx``, else torch).
ServeRuntime = Literal["auto", "onnx", "torch"]
SERVE_RUNTIMES: tuple[str, ...] = get_args(ServeRuntime)


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
    s3_connection_id: str | None
    """``KILN_S3_CONNECTION_ID``: an Airflow connection (amazon provider's ``aws`` fields: login = access key id,
    password = secret key, extras ``aws_session_token``, ``region_name``, ``endpoint_url``) whose credentials each
    task uses for S3. Unset: the standard AWS chain (environment variables, profile, instance role)."""
    mlflow_tracking_uri: str
    """``KILN_MLFLOW_TRACKING_URI``: MLflow tracking + registry (default SQLite under ``$KILN_HOME``)."""
    mlflow_artifact_root: str
    """``KILN_MLFLOW_ARTIFACT_ROOT``: where new MLflow experiments keep artifacts."""
    pipelines_dir: Path
    """``KILN_PIPELINES_DIR``: the folder of pipeline spec files (default ``<repo>/dags/pipelines``)."""
    data_roots: tuple[Path, ...]
    """The folders a spec's file source may be read from, besides the spec file's own folder: kiln's data folder
    ``$KILN_HOME/data``, then the folders of ``KILN_DATA_ROOTS`` (separated by ``:``). A source outside them
    (after ``..`` and symlinks are resolved) is refused."""
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
    serve_runtime: ServeRuntime
    """``KILN_SERVE_RUNTIME``: what runs the models in the model servers: ``auto`` (default: ONNX Runtime when a
    bundle has ``model.onnx``, else the exported torch program), ``onnx`` or ``torch``; the server's ``--runtime``
    flag overrides it."""
    serve_s3_keys: tuple[str, str] | None
    """``KILN_SERVE_AWS_ACCESS_KEY_ID`` and ``KILN_SERVE_AWS_SECRET_ACCESS_KEY``: the model servers' own S3 keys
    (least privilege: write ``<pipeline>/_capture/`` and ``_feedback/``, read ``<pipeline>/_monitor/latest/``),
    given to each server kiln starts as its ``AWS_*`` keys. The platform's own S3 secret never reaches a server.
    Unset: a server has no S3 keys of kiln's (an instance role or ``AWS_PROFILE`` still applies). Both or neither."""
    mlflow_ui_url: str
    """``KILN_MLFLOW_UI_URL``: the MLflow UI that the Airflow UI's extra links point at (default
    ``http://127.0.0.1:5000``, where ``make up`` serves it)."""


def get_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``environ`` (default: the environment, now; not cached, so tests may change it).

    Raises:
        ValueError: a value is malformed; the message names the variable (and the allowed values).
    """
    env = os.environ if environ is None else environ
    home = Path(env.get("KILN_HOME") or REPO_ROOT / "var").resolve()
    return Settings(
        home=home,
        artifact_root=_artifact_root(env.get("KILN_ARTIFACT_ROOT") or str(home / "artifacts")),
        s3_endpoint_url=env.get("KILN_S3_ENDPOINT_URL") or None,
        s3_connection_id=env.get("KILN_S3_CONNECTION_ID") or None,
        mlflow_tracking_uri=env.get("KILN_MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
        mlflow_artifact_root=env.get("KILN_MLFLOW_ARTIFACT_ROOT") or (home / "mlartifacts").as_uri(),
        pipelines_dir=Path(env.get("KILN_PIPELINES_DIR") or REPO_ROOT / "dags" / "pipelines").resolve(),
        data_roots=(home / "data", *(Path(p).expanduser().resolve()
                                     for p in (env.get("KILN_DATA_ROOTS") or "").split(os.pathsep) if p)),
        pools_file=Path(env["KILN_POOLS_FILE"]).resolve() if env.get("KILN_POOLS_FILE") else None,
        pools_db_url=env.get("KILN_POOLS_DB_URL") or f"sqlite:///{home / 'pools.db'}",
        train_image=env.get("KILN_TRAIN_IMAGE") or "kiln-train:cpu",
        serving_dir=Path(env.get("KILN_SERVING_DIR") or home / "serving").resolve(),
        serve_host=env.get("KILN_SERVE_HOST") or "127.0.0.1",
        serve_port=_int_env("KILN_SERVE_PORT", 8765, env),
        serve_token=env.get("KILN_SERVE_TOKEN") or None,
        serve_runtime=_choice_env("KILN_SERVE_RUNTIME", SERVE_RUNTIMES, env),  # type: ignore[arg-type]
        serve_s3_keys=_key_pair_env("KILN_SERVE_AWS_ACCESS_KEY_ID", "KILN_SERVE_AWS_SECRET_ACCESS_KEY", env),
        mlflow_ui_url=(env.get("KILN_MLFLOW_UI_URL") or "http://127.0.0.1:5000").rstrip("/"),
    )


def _key_pair_env(id_name: str, secret_name: str, env: Mapping[str, str]) -> tuple[str, str] | None:
    """An access key id and its secret, both set or neither (a key without its secret cannot sign)."""
    key_id, secret = env.get(id_name) or None, env.get(secret_name) or None
    if (key_id is None) != (secret is None):
        missing, present = (secret_name, id_name) if secret is None else (id_name, secret_name)
        raise ValueError(f"{present} is set but {missing} is not: set both (the model servers' S3 key pair) or "
                         "neither")
    return None if key_id is None or secret is None else (key_id, secret)


@dataclass(frozen=True)
class ServiceSettings:
    """How ``make up`` runs the platform as services. Every field has a default for the embedded profile."""

    profile: Literal["embedded", "prod"]
    """``KILN_PROFILE``: ``embedded`` (SQLite everywhere, LocalExecutor) or ``prod`` (PostgreSQL for Airflow,
    MLflow and the lease store; CeleryExecutor on a Redis broker)."""
    airflow_host: str
    """``KILN_AIRFLOW_HOST``: the address the Airflow api-server (UI and REST) listens on (default ``127.0.0.1``)."""
    airflow_port: int
    """``KILN_AIRFLOW_PORT``: its port (default 8080)."""
    mlflow_port: int
    """``KILN_MLFLOW_PORT``: the port of the MLflow server ``make up`` starts (default 5000)."""
    postgres_url: str
    """``KILN_POSTGRES_URL``: the PostgreSQL server of the ``prod`` profile, as ``postgresql://user[:pw]@host:port``
    without a database; the profile uses the databases ``kiln_airflow``, ``kiln_mlflow`` and ``kiln_pools`` on it
    and creates them when missing (default ``postgresql://postgres@127.0.0.1:5432``)."""
    celery_broker_url: str
    """``KILN_CELERY_BROKER_URL``: the ``prod`` profile's Celery broker (default ``redis://127.0.0.1:6379/0``)."""
    celery_workers: int
    """``KILN_CELERY_WORKERS``: how many Celery workers the ``prod`` profile starts (default 2)."""
    celery_concurrency: int
    """``KILN_CELERY_CONCURRENCY``: task slots of each worker (default 2)."""


def get_service_settings(environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """Read the service settings from ``environ`` (default: the environment, now).

    Raises:
        ValueError: a value is malformed; the message names the variable and the allowed values.
    """
    env = os.environ if environ is None else environ
    profile = env.get("KILN_PROFILE") or "embedded"
    if profile not in ("embedded", "prod"):
        raise ValueError(f"environment variable KILN_PROFILE must be 'embedded' or 'prod', found {profile!r}")
    workers = _int_env("KILN_CELERY_WORKERS", 2, env)
    if workers < 1:
        raise ValueError(f"environment variable KILN_CELERY_WORKERS must be at least 1, found {workers}")
    return ServiceSettings(
        profile=profile,  # type: ignore[arg-type]
        airflow_host=env.get("KILN_AIRFLOW_HOST") or "127.0.0.1",
        airflow_port=_int_env("KILN_AIRFLOW_PORT", 8080, env),
        mlflow_port=_int_env("KILN_MLFLOW_PORT", 5000, env),
        postgres_url=(env.get("KILN_POSTGRES_URL") or "postgresql://postgres@127.0.0.1:5432").rstrip("/"),
        celery_broker_url=env.get("KILN_CELERY_BROKER_URL") or "redis://127.0.0.1:6379/0",
        celery_workers=workers,
        celery_concurrency=_int_env("KILN_CELERY_CONCURRENCY", 2, env),
    )


def _artifact_root(raw: str) -> Path | str:
    # A URI names a remote store and must not be resolved against the working directory like a path.
    return raw if "://" in raw else Path(raw).resolve()


def _int_env(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if environ is None else environ).get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, found {raw!r}") from None


def _choice_env(name: str, choices: tuple[str, ...], environ: Mapping[str, str]) -> str:
    """The variable's value, one of ``choices`` (unset or empty: the first)."""
    raw = environ.get(name) or choices[0]
    if raw not in choices:
        raise ValueError(f"environment variable {name} must be one of {', '.join(choices)}, found {raw!r}")
    return raw
