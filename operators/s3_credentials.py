"""S3 credentials from an Airflow connection (``KILN_S3_CONNECTION_ID``), for the task that runs now.

Unset, the artifact store and MLflow use the standard AWS chain (environment variables, profile, instance role).
Set, the operators call :func:`use_s3_connection` before a step touches the store: it reads the connection and exports
its keys as the standard chain's environment variables. An environment export rather than a boto3 ``Session``
argument, because MLflow's S3 artifact repository (the same bucket) reads only the standard chain; and Airflow 3
runs each task in a process of its own, so the export is scoped to that one task (and the processes it starts,
such as torchrun). The connection's fields are the amazon provider's (login, password, extras ``aws_session_token``,
``region_name``, ``endpoint_url``), so an existing ``aws`` connection works as is; kiln reads them itself instead of
depending on ``apache-airflow-providers-amazon``, which would bring common-sql, http, PyAthena, redshift_connector,
watchtower and the SageMaker Studio SDK into every install for five fields.
"""

from __future__ import annotations

import logging
import os

from airflow.sdk import Connection
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from kiln.tasks.settings import get_settings

log = logging.getLogger(__name__)


def use_s3_connection() -> tuple[str, ...]:
    """Export the S3 credentials of the Airflow connection ``KILN_S3_CONNECTION_ID`` into this process's
    environment; do nothing when the setting is unset.

    Sets ``AWS_ACCESS_KEY_ID`` (login) and ``AWS_SECRET_ACCESS_KEY`` (password), which override whatever the
    environment held; ``AWS_SESSION_TOKEN`` from the extra ``aws_session_token``, and removes an inherited one when
    the connection has none (it would belong to other keys); ``AWS_DEFAULT_REGION`` from ``region_name``; and
    ``KILN_S3_ENDPOINT_URL`` from ``endpoint_url`` unless that setting is already set. The secret is never logged:
    only the connection id and the last four characters of the access key id.

    Returns:
        The names of the variables set (empty when the setting is unset).

    Raises:
        AirflowFailException: the connection does not exist, or has no login or password (a retry cannot fix
            either, so the task fails at once).
    """
    conn_id = get_settings().s3_connection_id
    if not conn_id:
        return ()
    conn = _get(conn_id)
    key_id, secret = conn.login, conn.password
    if not key_id or not secret:
        missing = [name for name, value in (("login", key_id), ("password", secret)) if not value]
        raise AirflowFailException(
            f"Airflow connection {conn_id!r} named by KILN_S3_CONNECTION_ID has no {' and no '.join(missing)}: set "
            "its login to the access key id and its password to the secret access key.")
    extra = conn.extra_dejson
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    if extra.get("aws_session_token"):
        env["AWS_SESSION_TOKEN"] = str(extra["aws_session_token"])
    else:
        os.environ.pop("AWS_SESSION_TOKEN", None)
    if extra.get("region_name"):
        env["AWS_DEFAULT_REGION"] = str(extra["region_name"])
    if extra.get("endpoint_url") and not get_settings().s3_endpoint_url:
        env["KILN_S3_ENDPOINT_URL"] = str(extra["endpoint_url"])
    os.environ.update(env)
    log.info("S3 credentials from Airflow connection %r (access key id ...%s): set %s", conn_id,
             key_id[-4:], ", ".join(sorted(env)))
    return tuple(sorted(env))


def _get(conn_id: str) -> Connection:
    """The connection ``conn_id`` from Airflow's secrets backends (``AIRFLOW_CONN_*``, the metadata DB via the
    execution API, or a configured backend), found the same way in a worker and under ``dag.test()``."""
    try:
        conn: Connection = Connection.get(conn_id)
    except AirflowNotFoundException:
        raise AirflowFailException(
            f"Airflow connection {conn_id!r} named by KILN_S3_CONNECTION_ID does not exist. Add it with "
            f"`airflow connections add {conn_id} --conn-type aws --conn-login <access key id> --conn-password "
            f"<secret access key> --conn-extra '{{\"endpoint_url\": \"...\", \"region_name\": \"...\"}}'`, or set "
            f"AIRFLOW_CONN_{conn_id.upper()} to its JSON; or unset KILN_S3_CONNECTION_ID to use the standard AWS "
            "credential chain.") from None
    return conn
