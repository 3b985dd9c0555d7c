"""``kiln_champion``: move a pipeline's ``champion`` alias by hand, as an approval or a rollback, and serve it.

Trigger it from the UI's form or the REST API with the Params below. A rollback without a version returns to the
champion before the current one. The model server, if the pipeline's model is being served, switches to the new
champion before the run succeeds. Every move is recorded in the registry (``kiln models history``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException

from kiln.tasks.settings import get_settings
from kiln.tasks.spec import load_specs

_models = sorted(spec.name for _, spec in load_specs(get_settings().pipelines_dir)[0])

with DAG(
    dag_id="kiln_champion",
    description="Approve a model version or roll the champion back, and serve it",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["kiln", "registry"],
    params={
        "model": Param(_models[0] if _models else "", type="string", enum=_models or [""], title="Model",
                       description="The pipeline whose champion moves."),
        "action": Param("rollback", type="string", enum=["rollback", "approve"], title="Action",
                        description="rollback: back to an earlier champion; approve: promote a version that did "
                                    "not pass the gate, on your authority."),
        "version": Param(None, type=["null", "string"], pattern=r"^[0-9]+$", title="Version",
                         description="The version to make champion; empty with rollback: the previous champion."),
        "reason": Param("", type="string", minLength=3, title="Reason",
                        description="Why: recorded with the move in the registry's history."),
    },
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": timedelta(seconds=10)},
):

    @task(task_id="set_champion")
    def set_champion(params: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
        from kiln.operators.s3_credentials import use_s3_connection
        from kiln.tasks.pipeline.champion import set_champion as move
        from kiln.tasks.spec import spec_named
        from kiln.tasks.tracking.registry import RegistryError

        use_s3_connection()  # the rollout records and bundles may live in an S3 store
        p = dict(params or {})
        if p["action"] == "approve" and not p.get("version"):
            raise AirflowFailException("Param 'version' is required to approve: name the version to promote")
        try:
            return move(spec_named(p["model"]), p.get("version") or None, action=p["action"], reason=p["reason"],
                        actor=f"dag:kiln_champion/{run_id}").to_dict()
        except (LookupError, RegistryError) as exc:  # an unknown model or version: retrying cannot fix it
            raise AirflowFailException(str(exc)) from exc

    set_champion()
