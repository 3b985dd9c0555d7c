"""The ``infra_validate`` step: load a model bundle in the real serving runtime before it is deployed.

A throwaway ``python -m kiln.tasks.serving`` is started on a free loopback port, with a deployment that holds only this
bundle and a random token. The bundle's sample rows (raw input, as a client would send it) are replayed over HTTP,
each row as a one-row request (timed) and all rows as one batch, and the served predictions are compared with the
predictions the training side recorded for the same rows (train/serve parity). The step fails when the two differ
by more than ``tolerance`` (relative to the size of a regression value: :mod:`kiln.tasks.bundle.parity`), when a
served label is not the most probable class, or when the p99 latency of the one-row requests exceeds
``latency_budget_ms``. The server is stopped however the step ends.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.bundle.parity import PARITY_RULE
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.pipeline.gate_decision import require_passed
from kiln.tasks.processes import free_port
from kiln.tasks.spec import InfraValidationSpec, PipelineSpec
from kiln.tasks.storage.artifacts import write_json

if TYPE_CHECKING:
    from kiln.tasks.serving.client import ServingClient

log = logging.getLogger(__name__)

#: Largest batch sent in one request (the server's default ``--max-batch``).
MAX_BATCH = 512
#: The version the throwaway deployment gives the bundle.
VALIDATION_VERSION = "infra-validation"


@dataclass(frozen=True)
class InfraValidateConfig:
    """Settings of the ``infra_validate`` step."""

    bundle_dir: Path
    """The model bundle to validate (:func:`kiln.tasks.bundle.export.export_bundle` output)."""
    rules: InfraValidationSpec = field(default_factory=InfraValidationSpec)
    """``deployment.infra_validation``: parity tolerance, latency budget, requests timed (validated there)."""
    start_timeout_s: float = 60
    """How long the server may take to load the bundle."""

    def __post_init__(self) -> None:
        if not self.start_timeout_s > 0:
            raise ValueError(f"InfraValidateConfig.start_timeout_s must be positive seconds, found "
                             f"{self.start_timeout_s!r}")

    @classmethod
    def from_spec(cls, spec: PipelineSpec, bundle_dir: Path) -> InfraValidateConfig:
        """The config of ``deployment.infra_validation`` for the bundle in ``bundle_dir``."""
        return cls(bundle_dir=bundle_dir, rules=spec.deployment.infra_validation)


@dataclass(frozen=True)
class InfraValidateResult:
    """What the serving runtime did with the bundle."""

    passed: bool
    max_diff: float | None
    """Largest served-vs-training difference over all rows, one-row and batch, by the rule in ``compared``
    (``None``: nothing was served)."""
    p50_ms: float | None
    p99_ms: float | None
    """Latency percentiles of the one-row requests at the client."""
    rows: int
    """Sample rows replayed."""
    requests: int
    """One-row requests timed."""
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (e.g. for XCom)."""
        return {"passed": self.passed, "max_diff": self.max_diff, "compared": PARITY_RULE, "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms, "rows": self.rows, "requests": self.requests, "reason": self.reason}


class InfraValidationError(RuntimeError):
    """The bundle failed infra validation; ``result`` holds the measurements and the reason."""

    def __init__(self, result: InfraValidateResult):
        self.result = result
        super().__init__(f"infra validation failed: {result.reason}")


def run_infra_validate(config: InfraValidateConfig) -> InfraValidateResult:
    """Serve the bundle from a throwaway server and check parity and latency.

    Args:
        config: the bundle and the thresholds.

    Returns:
        The measurements of a bundle that passed.

    Raises:
        InfraValidationError: parity or latency failed, or the server could not load or serve the bundle.
        BundleError: the bundle cannot be read at all.
    """
    import numpy as np

    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.serving.client import ServingClient, ServingError
    from kiln.tasks.serving.deployment import CaptureSettings, Deployment, ModelRef, utc_now, write_deployment
    from kiln.tasks.serving.process import ServerStartError, ensure_server, stop_server

    bundle_dir = Path(config.bundle_dir).resolve()
    bundle = load_bundle(bundle_dir)
    raw, expected_y = bundle.sample()
    records = records_from_frame(raw)
    expected = bundle.format_predictions(np.asarray(expected_y))
    n_single = max(config.rules.requests, len(records))
    model = str((bundle.manifest.get("metadata") or {}).get("pipeline") or bundle_dir.name)
    with tempfile.TemporaryDirectory(prefix="kiln-infra-validate-") as tmp:
        run_dir = Path(tmp)
        # No capture: its replayed requests are not traffic, and would land in the pipeline's capture folders.
        deployment = write_deployment(run_dir / "deployment.json", Deployment(
            model=model, champion=ModelRef(VALIDATION_VERSION, str(bundle_dir)), updated_at=utc_now(),
            capture=CaptureSettings(0.0)))
        token = secrets.token_urlsafe(32)
        try:
            # A throwaway server: it dies with this task, even by SIGKILL, instead of serving on unowned.
            handle = ensure_server(deployment, host="127.0.0.1", port=free_port(), token=token, run_dir=run_dir,
                                   start_timeout_s=config.start_timeout_s, die_with_parent=True)
            with ServingClient(handle.url, token) as client:
                served_single, latencies = _replay_single(client, records, n_single)
                served_batch = _replay_batch(client, records)
        except ServerStartError as exc:
            raise _failed(len(records), f"the serving runtime refused to load the bundle {bundle_dir} (loading, "
                                        f"its warm-up or its parity check on the sample predictions failed): {exc}"
                          ) from exc
        except ServingError as exc:
            raise _failed(len(records), f"the serving runtime failed to serve the bundle {bundle_dir}: {exc}") \
                from exc
        finally:
            stop_server(run_dir)
    return _judge(config, bundle_dir, expected, served_single, served_batch, latencies, n_single)


def _failed(rows: int, reason: str) -> InfraValidationError:
    return InfraValidationError(InfraValidateResult(False, None, None, None, rows, 0, reason))


def _replay_single(client: ServingClient, records: list[dict[str, Any]],
                   n: int) -> tuple[list[dict[str, Any]], list[float]]:
    """``n`` one-row requests cycling over ``records``; the first answer per row and every latency in ms."""
    served: list[dict[str, Any]] = []
    latencies: list[float] = []
    for i in range(n):
        start = time.perf_counter()
        body = client.predict([records[i % len(records)]])
        latencies.append((time.perf_counter() - start) * 1000)
        if i < len(records):
            served.append(body["predictions"][0])
    return served, latencies


def _replay_batch(client: ServingClient, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    served: list[dict[str, Any]] = []
    for start in range(0, len(records), MAX_BATCH):
        served.extend(client.predict(records[start:start + MAX_BATCH])["predictions"])
    return served


def infra_validate(ctx: RunContext) -> InfraValidateResult:
    """Load the candidate's bundle in the serving runtime and check parity and latency before any deployment.

    The report goes to ``<run>/infra_validate/report.json`` whether the candidate passes or not.

    Raises:
        GateRejectedError: the gate rejected the candidate.
        InfraValidationError: parity or latency failed (the report is published first).
    """
    require_passed(ctx)
    config = InfraValidateConfig.from_spec(ctx.spec, ctx.input_dir(keys.BUNDLE))
    try:
        result = run_infra_validate(config)
    except InfraValidationError as exc:
        failed = exc.result
        ctx.publish(keys.INFRA_VALIDATE, lambda out: write_json(out / keys.REPORT_FILE, failed.to_dict()))
        raise
    ctx.publish(keys.INFRA_VALIDATE, lambda out: write_json(out / keys.REPORT_FILE, result.to_dict()))
    return result


def _judge(config: InfraValidateConfig, bundle_dir: Path, expected: list[dict[str, Any]],
           served_single: list[dict[str, Any]], served_batch: list[dict[str, Any]], latencies: list[float],
           n_single: int) -> InfraValidateResult:
    import numpy as np

    from kiln.tasks.bundle.parity import compare_predictions

    diff_single, problem_single = compare_predictions(served_single, expected)
    diff_batch, problem_batch = compare_predictions(served_batch, expected)
    max_diff = max(diff_single, diff_batch)
    p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99]))
    problems = [f"parity (one-row requests): {problem_single}" if problem_single else "",
                f"parity (batch request): {problem_batch}" if problem_batch else ""]
    if max_diff > config.rules.tolerance:
        problems.append(f"parity: served predictions differ from the training-side predictions by up to "
                        f"{max_diff:.3g} (tolerance {config.rules.tolerance:g} of {PARITY_RULE})")
    if p99 > config.rules.latency_budget_ms:
        problems.append(f"latency: p99 of one-row requests is {p99:.1f} ms, over the budget of "
                        f"{config.rules.latency_budget_ms:g} ms")
    problems = [p for p in problems if p]
    passed = not problems
    reason = "; ".join(problems) if problems else (
        f"parity within {config.rules.tolerance:g} (max difference {max_diff:.3g} of {PARITY_RULE}) over "
        f"{len(expected)} rows; "
        f"p99 {p99:.1f} ms within {config.rules.latency_budget_ms:g} ms")
    result = InfraValidateResult(passed, max_diff, p50, p99, len(expected), n_single, reason)
    log.info("infra validation of %s %s: %s", bundle_dir, "passed" if passed else "FAILED", reason)
    if not passed:
        raise InfraValidationError(result)
    return result
