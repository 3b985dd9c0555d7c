"""The first release steps of a pipeline run: ``register`` the evaluated candidate, then ``gate`` it.

``register`` exports the trained model as a self-contained bundle into ``<run>/bundle``, logs it to the training
run and makes it a version of the pipeline's registered model, tagged with its provenance. ``gate`` scores the
candidate AND the current champion on this run's test rows (the same snapshot for both), applies the spec's
thresholds, margin, bootstrap bounds and slice checks, and writes the decision record to ``<run>/gate`` and to
MLflow. A rejected candidate is not an error of the step: the decision is the step's output, and the later steps
(:mod:`kiln.tasks.steps.deploy`) refuse to deploy it with :class:`GateRejectedError`.
"""

from __future__ import annotations

import logging
import subprocess
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.settings import REPO_ROOT, get_settings
from kiln.tasks.storage.artifacts import file_sha256, read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.tracking.registry import Registry

log = logging.getLogger(__name__)

DECISION_FILE = "decision.json"
#: Folder inside the MLflow run that receives the gate's decision record.
MLFLOW_GATE_PATH = "gate"


class GateRejectedError(RuntimeError):
    """The candidate did not pass the gate; ``decision`` is the gate's record."""

    def __init__(self, decision: dict[str, Any]):
        self.decision = decision
        super().__init__(f"the gate rejected version {decision['candidate']['version']} of "
                         f"{decision['model']}: {decision['reason']}")


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


def registry() -> Registry:
    """The configured model registry (imported here: ``kiln.tasks.tracking.registry`` imports MLflow)."""
    from kiln.tasks.tracking.registry import Registry
    from kiln.tasks.tracking.runs import use_s3_endpoint

    use_s3_endpoint()  # versions' bundles are logged to, and fetched from, the MLflow artifact root
    return Registry(get_settings().mlflow_tracking_uri)


def bundle_cache(model: str) -> Path:
    """Where versions of ``model`` are fetched for serving and for scoring the champion."""
    return get_settings().serving_dir / model / "bundles"


def register(ctx: RunContext) -> dict[str, Any]:
    """Export the trained model to ``<run>/bundle`` and register it as a version of the pipeline's model."""
    from kiln.tasks.bundle.load import ExportConfig, export_bundle
    from kiln.tasks.steps.build_features import TEST_RAW_FILE
    from kiln.tasks.steps.evaluate import METRICS_FILE
    from kiln.tasks.steps.ingest import MANIFEST_FILE
    from kiln.tasks.tracking.registry import RUN_KEY_TAG
    from kiln.tasks.tracking.runs import find_run

    spec = ctx.spec
    # The training run, found without reopening it: evaluate marked it finished.
    run_id = find_run(get_settings().mlflow_tracking_uri, spec.name, ctx.run_key)
    evaluation = read_json(ctx.input_dir("evaluate") / METRICS_FILE)
    tags = {RUN_KEY_TAG: ctx.run_key, "kiln.mlflow_run_id": run_id, "kiln.spec_hash": spec.spec_hash(),
            "kiln.data_hash": read_json(ctx.input_dir("ingest") / MANIFEST_FILE)["sha256"],
            "kiln.test_data_hash": file_sha256(ctx.input_dir("build_features") / TEST_RAW_FILE),
            "kiln.code_version": code_version(),
            f"kiln.test/{spec.primary_metric}": str(evaluation.get(f"test/{spec.primary_metric}"))}
    config = ExportConfig(features_dir=ctx.input_dir("build_features"), model_dir=ctx.input_dir("train"),
                          metadata={"pipeline": spec.name, **tags})
    with ctx.store.writer(ctx.key("bundle")) as out:
        export_bundle(config, out)
    version = registry().register(spec.name, run_id, ctx.input_dir("bundle"), tags)
    log.info("candidate: %s version %s (%s %s)", spec.name, version.version, spec.primary_metric,
             tags[f"kiln.test/{spec.primary_metric}"])
    return {"model": spec.name, "version": version.version, "mlflow_run_id": run_id,
            "bundle_uri": ctx.store.uri(ctx.key("bundle")), "tags": tags}


def _aligned_probabilities(probs: np.ndarray, classes: tuple[str, ...] | None,
                           target: tuple[str, ...] | None) -> np.ndarray:
    """Reorder a champion's class probabilities into the candidate's class order (a class it never saw: 0)."""
    if target is None or classes is None or tuple(classes) == tuple(target):
        return probs
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(probs), len(target)), dtype=probs.dtype)
    for j, c in enumerate(target):
        if c in index:
            out[:, j] = probs[:, index[c]]
    return out / np.clip(out.sum(axis=1, keepdims=True), 1e-12, None)


def gate(ctx: RunContext) -> dict[str, Any]:
    """Decide whether this run's candidate may replace the champion; publish and log the decision record."""
    from kiln.tasks.bundle.load import load_bundle
    from kiln.tasks.evaluation.gate_rules import GateConfig, decide
    from kiln.tasks.features.transform import FeatureTransform
    from kiln.tasks.steps.build_features import FEATURE_SPEC_FILE, TEST_RAW_FILE, load_split
    from kiln.tasks.steps.evaluate import PREDICTIONS_FILE
    from kiln.tasks.tracking.registry import RUN_KEY_TAG

    spec = ctx.spec
    reg = registry()
    candidate = reg.find_by_run_key(spec.name, ctx.run_key)
    if candidate is None:
        raise RuntimeError(f"no registered version of {spec.name} for run {ctx.run_key}; run the register step")
    features_dir = ctx.input_dir("build_features")
    _, y_test = load_split(features_dir, "test")
    raw_test = pd.read_parquet(features_dir / TEST_RAW_FILE)
    transform = FeatureTransform.load(features_dir / FEATURE_SPEC_FILE)
    candidate_pred = np.load(ctx.input_dir("evaluate") / PREDICTIONS_FILE)
    champion = reg.champion(spec.name)
    # A rerun of a promoted run's gate finds its candidate already champion: nothing to compare with.
    compared = champion if champion is not None and champion.version != candidate.version else None
    champion_pred = None
    if compared is not None:
        bundle = load_bundle(reg.fetch_bundle(compared, bundle_cache(spec.name)))
        champion_pred = bundle.predict_frame(raw_test)
        if spec.task == "classification":
            champion_pred = _aligned_probabilities(champion_pred, bundle.classes, transform.classes)
    decision = decide(GateConfig.from_spec(spec), y_test, candidate_pred, champion_pred, transform.n_classes, raw_test)
    reason = decision.reason
    if champion is not None and compared is None:
        reason = f"version {candidate.version} is already the champion; {reason}"
    record = {
        "model": spec.name, "decision": "passed" if decision.passed else "failed", "passed": decision.passed,
        "reason": reason,
        "candidate": {"version": candidate.version, "run_id": candidate.run_id, "run_key": ctx.run_key},
        "champion": ({"version": compared.version, "run_id": compared.run_id,
                      "run_key": compared.tags.get(RUN_KEY_TAG)} if compared is not None else None),
        "test_data_hash": candidate.tags.get("kiln.test_data_hash"), "data_hash": candidate.tags.get("kiln.data_hash"),
        "test_rows": len(y_test), "spec_hash": spec.spec_hash(), "primary_metric": spec.primary_metric,
        "thresholds": dict(spec.evaluation.thresholds), "gate": spec.evaluation.gate.model_dump(mode="json"),
        **{k: v for k, v in decision.to_dict().items() if k not in ("passed", "reason")},
    }
    with ctx.store.writer(ctx.key("gate")) as out:
        write_json(out / DECISION_FILE, record)
    _log_decision(reg, record)
    log.info("gate %s: %s", record["decision"].upper(), reason)
    return record


def _log_decision(reg: Registry, record: dict[str, Any]) -> None:
    """The decision record on the candidate's MLflow run (file + tags) and on its model version (tags)."""
    run_id, version = record["candidate"]["run_id"], record["candidate"]["version"]
    reg.client.log_dict(run_id, record, f"{MLFLOW_GATE_PATH}/{DECISION_FILE}")
    for key, value in (("kiln.gate", record["decision"]), ("kiln.gate_reason", record["reason"][:4000])):
        reg.client.set_tag(run_id, key, value)
        reg.client.set_model_version_tag(record["model"], version, key, value)


def read_decision(ctx: RunContext) -> dict[str, Any]:
    """This run's gate decision record.

    Raises:
        ArtifactNotFoundError: the gate step has not run.
    """
    return read_json(ctx.input_dir("gate") / DECISION_FILE)


def require_passed(ctx: RunContext) -> dict[str, Any]:
    """The decision record, if the candidate passed.

    Raises:
        GateRejectedError: it did not.
    """
    decision = read_decision(ctx)
    if not decision["passed"]:
        raise GateRejectedError(decision)
    return decision
