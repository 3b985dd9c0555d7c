"""kiln as an Airflow provider: what ``pip install kiln`` into an Airflow deployment registers there.

Airflow finds this through the ``apache_airflow_provider`` entry point (``pyproject.toml``): ``airflow providers
list`` then shows kiln, and the UI knows its operators' extra links (the MLflow run, the validation report, the
gate's decision) without any plugin.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

INTEGRATION = "kiln"
#: :data:`kiln.operators.links.LINKS` by name: Airflow reads this while it configures itself, before any operator
#: module can be imported (a test keeps the two lists equal).
EXTRA_LINKS = ("kiln.operators.links.MlflowRunLink", "kiln.operators.links.ValidationReportLink",
               "kiln.operators.links.GateDecisionLink")


def get_provider_info() -> dict[str, Any]:
    """The provider record Airflow's ProvidersManager reads (its ``provider_info.schema.json`` fields)."""
    return {
        "package-name": "kiln",
        "name": "kiln",
        "description": "ML pipelines on Apache Airflow: validated data, distributed PyTorch training on leased "
                       "devices, gated releases and served models.",
        "versions": [metadata.version("kiln")],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["software"]}],
        "operators": [{"integration-name": INTEGRATION, "python-modules": [
            "kiln.operators.step", "kiln.operators.train", "kiln.operators.command", "kiln.operators.pools"]}],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["kiln.operators.pools"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["kiln.operators.pools"]}],
        "extra-links": list(EXTRA_LINKS),
    }
