"""Judging a candidate against a champion, for ``gate`` and again for ``deploy`` and ``promote`` when the champion
moved after the gate compared against it (another run promoted in between).

The candidate AND the champion are scored on this run's test rows (the same snapshot for both; the champion's own
bundle transforms the raw rows), then the spec's thresholds, margin, bootstrap bounds and slice checks are applied
(:mod:`kiln.tasks.evaluation.gate_rules`). The decision record goes to ``<run>/gate/decision.json`` and to the
candidate's MLflow run; a re-gate replaces it, keeping what it superseded in ``regated``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.endpoint import bundle_cache
from kiln.tasks.pipeline.gate_decision import GateRecord, GateRejectedError
from kiln.tasks.storage.artifacts import write_json

if TYPE_CHECKING:
    import numpy as np

    from kiln.tasks.tracking.registry import ModelVersionInfo, Registry

log = logging.getLogger(__name__)


def candidate_of(ctx: RunContext, reg: Registry) -> ModelVersionInfo:
    """This run's registered version.

    Raises:
        RuntimeError: the candidate was not registered (run ``register`` first).
    """
    candidate = reg.find_by_run_key(ctx.spec.name, ctx.run_key)
    if candidate is None:
        raise RuntimeError(f"no registered version of {ctx.spec.name} for run {ctx.run_key}; run the register step")
    return candidate


def rival(candidate: ModelVersionInfo, champion: ModelVersionInfo | None) -> ModelVersionInfo | None:
    """The champion to compare with: none when there is none, or when it is the candidate itself (a rerun of a
    promoted run's gate)."""
    return champion if champion is not None and champion.version != candidate.version else None


def judge(ctx: RunContext, reg: Registry, candidate: ModelVersionInfo,
          champion: ModelVersionInfo | None) -> GateRecord:
    """The decision record of ``candidate`` against ``champion`` (``None``: the first model), on this run's test
    rows."""
    import numpy as np
    import pandas as pd

    from kiln.tasks.bundle.load import load_bundle
    from kiln.tasks.evaluation.gate_rules import GateConfig, decide
    from kiln.tasks.features.splits import TEST_RAW_FILE, load_split
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform
    from kiln.tasks.tracking.registry import RUN_KEY_TAG

    spec = ctx.spec
    features_dir = ctx.input_dir(keys.BUILD_FEATURES)
    _, y_test = load_split(features_dir, "test")
    raw_test = pd.read_parquet(features_dir / TEST_RAW_FILE)
    transform = FeatureTransform.load(features_dir / FEATURE_SPEC_FILE)
    candidate_pred = np.load(ctx.input_dir(keys.EVALUATE) / keys.PREDICTIONS_FILE)
    compared = rival(candidate, champion)
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
    return GateRecord(
        model=spec.name, passed=decision.passed, reason=reason,
        candidate={"version": candidate.version, "run_id": candidate.run_id, "run_key": ctx.run_key},
        champion=({"version": compared.version, "run_id": compared.run_id, "run_key": compared.tags.get(RUN_KEY_TAG)}
                  if compared is not None else None),
        primary_metric=spec.primary_metric, test_rows=len(y_test), data_hash=candidate.tags.get("kiln.data_hash"),
        test_data_hash=candidate.tags.get("kiln.test_data_hash"), spec_hash=spec.spec_hash(),
        thresholds=dict(spec.evaluation.thresholds), gate=spec.evaluation.gate.model_dump(mode="json"),
        **{k: v for k, v in decision.to_dict().items() if k not in ("passed", "reason")})


def publish_decision(ctx: RunContext, reg: Registry, record: GateRecord) -> None:
    """The record to ``<run>/gate/decision.json``, the candidate's MLflow run (file + tags) and its version's tags."""
    ctx.publish(keys.GATE, lambda out: write_json(out / keys.DECISION_FILE, record.to_dict()))
    run_id, version = record.candidate["run_id"], record.candidate_version
    reg.client.log_dict(run_id, record.to_dict(), f"{keys.MLFLOW_GATE_PATH}/{keys.DECISION_FILE}")
    for key, value in (("kiln.gate", record.decision), ("kiln.gate_reason", record.reason[:4000])):
        reg.client.set_tag(run_id, key, value)
        reg.client.set_model_version_tag(record.model, version, key, value)


def regate_if_moved(ctx: RunContext, reg: Registry, record: GateRecord) -> GateRecord:
    """The decision that holds now: ``record`` if the champion is still the one it compared with; otherwise the
    candidate judged again against the new champion, published as the run's decision record (the earlier one kept
    in its ``regated`` list). Call it holding the model's champion lock, so the champion cannot move again.

    Raises:
        GateRejectedError: the candidate does not beat the new champion (the record says so and why).
        ChampionMismatchError: the champion alias was moved outside kiln.
    """
    candidate = reg.version(ctx.spec.name, record.candidate_version)
    now = rival(candidate, reg.champion(ctx.spec.name))
    before = record.champion["version"] if record.champion else None
    if (now.version if now else None) == before:
        return record
    moved = (f"re-gated: the champion moved from version {before or 'none'} to {now.version if now else 'none'} "
             f"after the gate compared against version {before or 'none'}")
    fresh = judge(ctx, reg, candidate, now)
    superseded = {"champion": record.champion, "decision": record.decision, "reason": record.reason,
                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fresh = GateRecord.from_dict({**fresh.to_dict(), "reason": f"{moved}; {fresh.reason}",
                                  "regated": [*record.regated, superseded]})
    publish_decision(ctx, reg, fresh)
    log.warning("%s: %s", ctx.spec.name, fresh.reason)
    if not fresh.passed:
        raise GateRejectedError(fresh)
    return fresh


def _aligned_probabilities(probs: np.ndarray, classes: tuple[str, ...] | None,
                           target: tuple[str, ...] | None) -> np.ndarray:
    """Reorder a champion's class probabilities into the candidate's class order (a class it never saw: 0)."""
    import numpy as np

    if target is None or classes is None or tuple(classes) == tuple(target):
        return probs
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(probs), len(target)), dtype=probs.dtype)
    for j, c in enumerate(target):
        if c in index:
            out[:, j] = probs[:, index[c]]
    return out / np.clip(out.sum(axis=1, keepdims=True), 1e-12, None)
