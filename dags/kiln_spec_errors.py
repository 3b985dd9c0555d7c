"""Reports invalid pipeline spec files as this file's Airflow import error (the DAG factory skips them).

Keeping the errors in their own file means one broken spec never hides the DAGs of the valid ones. The error
names each spec file, the field, what was found and what is allowed, or the limit a file crossed (size, nesting,
alias expansion, its parse time budget: ``kiln.tasks.spec.yaml_reader``) and a platform DAG name it took.
"""

from __future__ import annotations

from kiln.tasks.settings import get_settings
from kiln.tasks.spec import load_specs

_errors = load_specs(get_settings().pipelines_dir)[1]
if _errors:
    raise ValueError("\n\n".join(str(e) for e in _errors))
