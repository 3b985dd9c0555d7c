"""S3 credentials from an Airflow connection (``KILN_S3_CONNECTION_ID``): a pipeline through real Airflow
(``dag.test()``) against moto's S3 server on loopback, with the keys in nothing but the connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port
from s3_server import S3Endpoint, s3_endpoint  # noqa: F401

from kiln.tasks.pipeline.steps import STEPS as ALL_STEPS

pytestmark = [pytest.mark.integration, pytest.mark.s3]

#: Every variable the export may set, plus the ones that would otherwise supply credentials or an endpoint.
EXPORTED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
            "KILN_S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
OTHER_SOURCES = ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY",
                 "AWS_SECRET_KEY", "AWS_SECURITY_TOKEN")
#: The steps up to evaluate, in the pipeline's order.
STEPS = [s.name for s in ALL_STEPS][:[s.name for s in ALL_STEPS].index("evaluate") + 1]


def isolate_env(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> None:
    """Remove ``names`` from the environment so that whatever the test (or a task it runs) sets there is undone
    afterwards: ``delenv`` of an absent variable records nothing, so each is set first."""
    for name in names:
        monkeypatch.setenv(name, "-")
        monkeypatch.delenv(name)


def add_connection(monkeypatch: pytest.MonkeyPatch, login: str | None, password: str | None,
                   **extra: str) -> str:
    """An ``aws`` connection in ``AIRFLOW_CONN_<ID>`` (JSON) under a fresh id, named by KILN_S3_CONNECTION_ID."""
    conn_id = f"kiln_s3_{uuid.uuid4().hex[:8]}"
    conn = {"conn_type": "aws", "login": login, "password": password, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({k: v for k, v in conn.items() if v}))
    monkeypatch.setenv("KILN_S3_CONNECTION_ID", conn_id)
    return conn_id


def secret() -> str:
    return f"secret-{uuid.uuid4().hex}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    isolate_env(monkeypatch, EXPORTED + OTHER_SOURCES + ("KILN_S3_CONNECTION_ID",))
    return monkeypatch


# -- the function ---------------------------------------------------------------------------------------------


def test_unset_setting_leaves_the_environment_alone(clean_env: pytest.MonkeyPatch) -> None:
    from kiln.operators.s3_credentials import use_s3_connection

    clean_env.setenv("AWS_ACCESS_KEY_ID", "from-the-chain")
    before = dict(os.environ)
    assert use_s3_connection() == ()
    assert dict(os.environ) == before


def test_exports_exactly_the_connection(clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Login, password and the three extras become the standard chain's variables, and boto3 resolves them;
    nothing else in the environment changes and the log names the id and the key's last four characters only."""
    import boto3

    from kiln.operators.s3_credentials import use_s3_connection

    key, password, token = "AKIDCONNECTION0007", secret(), f"token-{uuid.uuid4().hex}"
    conn_id = add_connection(clean_env, key, password, aws_session_token=token, region_name="eu-west-3",
                             endpoint_url="http://127.0.0.1:9")
    before = dict(os.environ)
    with caplog.at_level("INFO", logger="kiln.operators.s3_credentials"):
        exported = use_s3_connection()

    expected = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": password, "AWS_SESSION_TOKEN": token,
                "AWS_DEFAULT_REGION": "eu-west-3", "KILN_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert exported == tuple(sorted(expected))
    assert dict(os.environ) == {**before, **expected}
    credentials = boto3.session.Session().get_credentials().get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (key, password, token)
    assert conn_id in caplog.text and "...0007" in caplog.text
    assert key not in caplog.text and password not in caplog.text and token not in caplog.text


def test_keeps_the_endpoint_setting_and_drops_a_foreign_session_token(clean_env: pytest.MonkeyPatch) -> None:
    """An explicit KILN_S3_ENDPOINT_URL wins over the connection's; an inherited session token belongs to other
    keys and goes; a region the connection does not name is left as it was."""
    from kiln.operators.s3_credentials import use_s3_connection

    clean_env.setenv("KILN_S3_ENDPOINT_URL", "http://explicit:9000")
    clean_env.setenv("AWS_SESSION_TOKEN", "token-of-other-keys")
    clean_env.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    add_connection(clean_env, "AKIDCONNECTION0008", secret(), endpoint_url="http://from-connection:9000")
    before = dict(os.environ)

    assert use_s3_connection() == ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert "AWS_SESSION_TOKEN" not in os.environ
    assert (os.environ["KILN_S3_ENDPOINT_URL"], os.environ["AWS_DEFAULT_REGION"]) == ("http://explicit:9000",
                                                                                      "ap-south-1")
    changed = {k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k)}
    assert changed == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


@pytest.mark.parametrize(("login", "password", "missing"),
                         [("AKIDCONNECTION0009", None, "no password"), (None, "pw", "no login"),
                          (None, None, "no login and no password")],
                         ids=["no-password", "no-login", "neither"])
def test_connection_without_keys_fails(clean_env: pytest.MonkeyPatch, login: str | None, password: str | None,
                                       missing: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from kiln.operators.s3_credentials import use_s3_connection

    conn_id = add_connection(clean_env, login, password, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(AirflowFailException, match=f"{conn_id}.*{missing}") as caught:
        use_s3_connection()
    assert "access key id" in str(caught.value)
    assert "AWS_ACCESS_KEY_ID" not in os.environ


def test_unknown_connection_names_the_id_and_the_fix(clean_env: pytest.MonkeyPatch) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from kiln.operators.s3_credentials import use_s3_connection

    clean_env.setenv("KILN_S3_CONNECTION_ID", "kiln_s3_absent")
    with pytest.raises(AirflowFailException) as caught:
        use_s3_connection()
    message = str(caught.value)
    assert "'kiln_s3_absent'" in message
    assert "airflow connections add kiln_s3_absent --conn-type aws" in message
    assert "AIRFLOW_CONN_KILN_S3_ABSENT" in message


# -- through Airflow ----------------------------------------------------------------------------------------

#: ``dag.test()`` in a process of its own: its environment is exactly what the test gives it, and everything the
#: tasks print or log (Airflow's structlog output included, which is bound to whatever stdout was current when
#: logging was first configured in the pytest process) comes back in one captured stream.
DAG_TEST = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert bag.import_errors == {}, bag.import_errors
dr = bag.dags["penguins_species"].test(run_conf=json.loads(sys.argv[2]))
tis = {ti.task_id: [str(ti.state), ti.try_number] for ti in dr.get_task_instances()}
print("DAG_TEST_RESULT " + json.dumps({"run_id": dr.run_id, "state": str(dr.state), "tasks": tis}))
"""


def run_dag(env: dict[str, str], conf: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Run the penguins DAG with ``dag.test()`` under ``env``; its result and its whole output."""
    proc = subprocess.run([sys.executable, "-c", DAG_TEST, str(REPO / "dags"), json.dumps(conf)], env=env,
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=540)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DAG_TEST_RESULT ")]
    assert proc.returncode == 0 and lines, f"dag.test() exited with {proc.returncode}:\n{proc.stdout[-4000:]}"
    return json.loads(lines[-1].split(" ", 1)[1]), proc.stdout


def task_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The session's environment without any AWS credential, profile, config file or endpoint, plus ``extra``."""
    absent = str(tmp_path / "no-such-aws-file")
    env = {k: v for k, v in os.environ.items()
           if k not in EXPORTED + OTHER_SOURCES + ("KILN_S3_CONNECTION_ID",) and not k.startswith("AIRFLOW_CONN_")}
    return {**env, "AWS_CONFIG_FILE": absent, "AWS_SHARED_CREDENTIALS_FILE": absent,
            "AWS_EC2_METADATA_DISABLED": "true", "KILN_HOME": str(tmp_path / "kiln"),
            "KILN_SERVE_PORT": str(free_port()), **extra}


def list_keys(client: Any, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_pipeline_with_credentials_only_in_a_connection(airflow_db: Path, s3_endpoint: S3Endpoint,  # noqa: F811
                                                        tmp_path: Path) -> None:
    """No AWS variable, profile or config file anywhere: the run gets its keys, region and endpoint from the
    connection alone, publishes every step to the bucket and MLflow's artifacts beside them, and no task output
    shows the secret."""
    from kiln.tasks.storage.artifacts import run_key

    checker = s3_endpoint.client(direct=True)  # the session's test keys (moto accepts any)
    bucket = f"kiln-conn-{uuid.uuid4().hex[:8]}"
    checker.create_bucket(Bucket=bucket)
    conn_id, password = f"kiln_s3_{uuid.uuid4().hex[:8]}", secret()
    conn = {"conn_type": "aws", "login": "AKIDCONNECTION0042", "password": password,
            "extra": {"region_name": "us-east-1", "endpoint_url": s3_endpoint.url}}
    env = task_env(tmp_path, KILN_S3_CONNECTION_ID=conn_id, **{f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(conn)},
                   KILN_ARTIFACT_ROOT=f"s3://{bucket}/kiln", KILN_MLFLOW_ARTIFACT_ROOT=f"s3://{bucket}/mlflow")

    result, output = run_dag(env, {"epochs": 2, "nproc": 1, "deployment": "none"})

    states = {task: state for task, (state, _) in result["tasks"].items()}
    assert result["state"] == "success", states
    assert all(states[t] == "success" for t in [*STEPS, "register", "gate"]), states
    run_prefix = f"kiln/{run_key('penguins_species', result['run_id'])}/"
    published = {k[len(run_prefix):].split("/", 1)[0] for k in list_keys(checker, bucket, run_prefix)
                 if k.endswith("/_manifest.json")}
    assert published >= set(STEPS), sorted(published)
    logged = list_keys(checker, bucket, "mlflow/penguins_species/")
    assert any("/artifacts/evaluate/" in k for k in logged), sorted(logged)
    assert f"S3 credentials from Airflow connection '{conn_id}' (access key id ...0042)" in output
    assert password not in output


def test_unknown_connection_fails_the_task_without_retry(airflow_db: Path, tmp_path: Path) -> None:
    env = task_env(tmp_path, KILN_S3_CONNECTION_ID="kiln_s3_not_added")

    result, output = run_dag(env, {"epochs": 1, "nproc": 1, "deployment": "none"})

    assert result["state"] == "failed"
    assert result["tasks"]["ingest"] == ["failed", 1], "a missing connection fails at once, without a retry"
    assert {result["tasks"][t][0] for t in STEPS[1:]} == {"upstream_failed"}
    assert "Airflow connection 'kiln_s3_not_added' named by KILN_S3_CONNECTION_ID does not exist" in output
    assert "airflow connections add kiln_s3_not_added --conn-type aws" in output
    assert "AIRFLOW_CONN_KILN_S3_NOT_ADDED" in output
