"""Where each step of a run publishes its output, and the files in it that later steps read.

A run's outputs live under ``<pipeline>/<run id>/`` in the artifact store; each step publishes one folder named
after its task id (``<run>/clean``), and the steps read each other's folders only through these names. File
formats owned by a library keep their names there (the split files in :mod:`kiln.tasks.features.splits`, the
training job's files in :mod:`kiln.tasks.training.job`, the bundle's in :mod:`kiln.tasks.bundle.files`).
"""

from __future__ import annotations

# The step keys: one folder per step, named as its Airflow task id.
INGEST = "ingest"
VALIDATE = "validate"
CLEAN = "clean"
BUILD_FEATURES = "build_features"
TRAIN = "train"
EVALUATE = "evaluate"
REGISTER = "register"
GATE = "gate"
INFRA_VALIDATE = "infra_validate"
DEPLOY = "deploy"
VERIFY = "verify"
PROMOTE = "promote"
#: The servable bundle that ``register`` exports (and registers as a model version).
BUNDLE = "bundle"
#: Scratch key where training keeps checkpoints across task retries.
CHECKPOINTS = "checkpoints"

# A tuned run (the spec's ``tuning:``): ``study`` opens the study, one ``trial`` task per trial trains into
# ``<run>/trials/<index>/train`` (checkpoints beside it), and ``train`` publishes the best trial's as ``<run>/train``.
STUDY = "study"
TRIAL = "trial"
TRIALS = "trials"


def trial_key(index: int, output: str) -> str:
    """The key, within a run, of one trial's ``train`` or ``checkpoints`` folder: ``trials/<index>/<output>``."""
    return f"{TRIALS}/{index}/{output}"

# ingest
SNAPSHOT_FILE = "snapshot.parquet"
#: Rows, schema, source and sha256 of the snapshot.
SNAPSHOT_MANIFEST_FILE = "manifest.json"
# validate
VALIDATION_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"
# clean
CLEAN_FILE = "clean.parquet"
CLEAN_REPORT_FILE = "clean_report.json"
# evaluate
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "test_predictions.npy"
# gate
DECISION_FILE = "decision.json"
# infra_validate, deploy, promote
REPORT_FILE = "report.json"

# Folders of the run's MLflow run that receive step outputs (the Airflow UI's extra links open them).
MLFLOW_VALIDATION_PATH = "validation"
MLFLOW_EVALUATE_PATH = "evaluate"
MLFLOW_GATE_PATH = "gate"
