"""The ``register`` step: export the trained model as a bundle and make it a version of the pipeline's model.

The bundle (:mod:`kiln.tasks.bundle`) goes to ``<run>/bundle`` and, as an MLflow Model (pyfunc) logged from the
training run that holds the bundle, becomes the new version of the registered model (named as the pipeline). The
version is tagged with its provenance: the run key and MLflow run, the spec hash, the ingest snapshot's and the test
split's hashes, kiln's code version, the pipeline's own code (``kiln.code_hash``, when it brings code) and the test
score. The bundle holds the training baseline that monitoring compares live traffic with
(:mod:`kiln.tasks.bundle.baseline`): the profile of the run's snapshot (``validate``'s, input columns only), a
sample of its rows, the distribution of ``evaluate``'s test predictions and the test metrics.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.settings import REPO_ROOT, get_settings
from kiln.tasks.storage.artifacts import file_sha256, read_json

if TYPE_CHECKING:
    from kiln.tasks.bundle.baseline import BaselineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterResult:
    """The registered version of the candidate."""

    model: str
    version: str
    mlflow_run_id: str
    bundle_uri: str
    tags: dict[str, str]
    """Provenance tags of the version (``kiln.run_key``, ``kiln.data_hash``, ``kiln.code_version``, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return asdict(self)


def code_version() -> str:
    """The git commit of the code (``-dirty`` with uncommitted changes), else the installed package version."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed package)
        return f"kiln-{metadata.version('kiln')}"


def register(ctx: RunContext) -> RegisterResult:
    """Export the trained model to ``<run>/bundle`` and register it as a version of the pipeline's model."""
    from kiln.tasks.bundle.export import ExportConfig, export_bundle
    from kiln.tasks.features.splits import TEST_RAW_FILE
    from kiln.tasks.tracking.registry import RUN_KEY_TAG, Registry
    from kiln.tasks.tracking.runs import find_run
    from kiln.tasks.training.job import CONFIG_FILE

    spec = ctx.spec
    # The training run, found without reopening it: evaluate marked it finished.
    run_id = find_run(get_settings().mlflow_tracking_uri, spec.name, ctx.run_key)
    evaluation = read_json(ctx.input_dir(keys.EVALUATE) / keys.METRICS_FILE)
    tags = {RUN_KEY_TAG: ctx.run_key, "kiln.mlflow_run_id": run_id, "kiln.spec_hash": spec.spec_hash(),
            "kiln.data_hash": read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE)["sha256"],
            "kiln.test_data_hash": file_sha256(ctx.input_dir(keys.BUILD_FEATURES) / TEST_RAW_FILE),
            "kiln.code_version": code_version(),
            f"kiln.test/{spec.primary_metric}": str(evaluation.get(f"test/{spec.primary_metric}"))}
    trained = read_json(ctx.input_dir(keys.TRAIN) / CONFIG_FILE)
    if trained.get("code_hash"):  # the pipeline's own code folder, as the training job ran it
        tags["kiln.code_hash"] = trained["code_hash"]
    config = ExportConfig(features_dir=ctx.input_dir(keys.BUILD_FEATURES), model_dir=ctx.input_dir(keys.TRAIN),
                          metadata={"pipeline": spec.name, **tags}, baseline=_baseline(ctx, evaluation))
    ctx.publish(keys.BUNDLE, lambda out: export_bundle(config, out))
    version = Registry.from_settings().register(spec.name, run_id, ctx.input_dir(keys.BUNDLE), tags)
    log.info("candidate: %s version %s (%s %s)", spec.name, version.version, spec.primary_metric,
             tags[f"kiln.test/{spec.primary_metric}"])
    return RegisterResult(model=spec.name, version=version.version, mlflow_run_id=run_id,
                          bundle_uri=ctx.store.uri(ctx.key(keys.BUNDLE)), tags=tags)


def _baseline(ctx: RunContext, evaluation: dict[str, Any]) -> BaselineConfig:
    """The bundle's training baseline: the run's snapshot and ``evaluate``'s test predictions and metrics."""
    from kiln.tasks.bundle.baseline import BaselineConfig
    from kiln.tasks.features.profile import PROFILE_FILE, DataProfile

    # validate profiled this very snapshot (a cache hit: the same bytes); without its output, export profiles it.
    profile = None
    if ctx.store.exists(ctx.key(keys.VALIDATE)) and (ctx.input_dir(keys.VALIDATE) / PROFILE_FILE).is_file():
        profile = DataProfile.from_dict(read_json(ctx.input_dir(keys.VALIDATE) / PROFILE_FILE))
    return BaselineConfig(rows_path=ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_FILE,
                          predictions_path=ctx.input_dir(keys.EVALUATE) / keys.PREDICTIONS_FILE,
                          metrics={k.removeprefix("test/"): v for k, v in evaluation.items() if k.startswith("test/")},
                          primary_metric=ctx.spec.primary_metric, seed=ctx.spec.training.seed, profile=profile)
