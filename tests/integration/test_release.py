"""The release loop in process, on real parts: MLflow registry (SQLite), torchrun training, a real model server.

A crippled training config never becomes champion and a better one does, with decision records that say why;
the served model answers raw test records exactly as the evaluate step predicted them (train/serve parity); and a
rollback serves the earlier version's exact predictions again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import pytest

if TYPE_CHECKING:
    from kiln.tasks.pipeline.context import RunContext
    from kiln.tasks.pipeline.runner import RunResult

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
MODEL = "penguins_species"


class Run(NamedTuple):
    result: RunResult
    ctx: RunContext


def _run(run_id: str, **params) -> Run:
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.runner import run_all

    ctx = make_context(SPEC, run_id, params)
    return Run(run_all(ctx), ctx)


def _served(records: list[dict]) -> dict:
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.spec import spec_named

    with Endpoint.of(spec_named(MODEL)).client() as client:
        return client.predict(records)


def _probabilities(served: dict) -> np.ndarray:
    return np.array([list(p["probabilities"].values()) for p in served["predictions"]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Three runs in order: a good first model, a crippled one, a better one (module-scoped: ~1 min of training).

    They get a registry, artifact store and model server (port) of their own, so the first is the model's first
    version.
    """
    from conftest import free_port, stop_model_servers

    home = tmp_path_factory.mktemp("release-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_HOME", str(home))
        mp.setenv("KILN_SERVE_PORT", str(free_port()))  # the session's port may hold another test's server
        try:
            good = _run("good", epochs=20)
            crippled = _run("crippled", epochs=1, learning_rate=1e-5)
            better = _run("better", epochs=40)
            yield {"good": good, "crippled": crippled, "better": better}
        finally:
            stop_model_servers(home / "serving")


def test_crippled_never_becomes_champion_and_better_does(runs: dict) -> None:
    from kiln.tasks.storage.artifacts import read_json
    from kiln.tasks.tracking.registry import Registry

    good, crippled, better = runs["good"].result["gate"], runs["crippled"].result["gate"], runs["better"].result["gate"]
    assert good.passed and good.champion is None and "first model" in good.reason
    assert runs["good"].result["promote"].champion == good.candidate_version
    slices = {c["name"] for c in good.checks if c["kind"] == "slice"}  # the spec's island slices
    assert any(name.startswith("slice island=") for name in slices), good.checks

    assert not crippled.passed
    assert crippled.champion["version"] == good.candidate_version  # compared with the then champion
    assert "accuracy" in crippled.reason and "threshold" in crippled.reason
    assert set(runs["crippled"].result.skipped) == {"infra_validate", "deploy", "verify", "promote"}

    assert better.passed and better.champion["version"] == good.candidate_version
    assert "champion" in better.reason
    reg = Registry.from_settings()
    assert reg.champion(MODEL).version == better.candidate_version
    assert reg.version(MODEL, crippled.candidate_version).tags["kiln.gate"] == "failed"
    assert [h["version"] for h in reg.history(MODEL)] == [good.candidate_version,
                                                          better.candidate_version]

    # The decision record is published with the run and logged to the candidate's MLflow run, same content.
    ctx = runs["crippled"].ctx
    published = read_json(ctx.input_dir("gate") / "decision.json")
    logged = reg.client.download_artifacts(crippled.candidate["run_id"], "gate/decision.json")
    assert read_json(logged) == published
    assert published["reason"] == crippled.reason and published["decision"] == "failed"
    assert published["test_data_hash"] == reg.version(MODEL, crippled.candidate_version).tags[
        "kiln.test_data_hash"]
    for key in ("candidate", "champion", "thresholds", "candidate_metrics", "champion_metrics", "checks", "reason"):
        assert published[key] is not None, key


def test_served_predictions_equal_the_evaluate_step(runs: dict) -> None:
    from kiln.tasks.bundle.load import records_from_frame
    from kiln.tasks.features.splits import TEST_RAW_FILE
    from kiln.tasks.pipeline.keys import PREDICTIONS_FILE

    ctx = runs["better"].ctx
    raw = pd.read_parquet(ctx.input_dir("build_features") / TEST_RAW_FILE)
    records = records_from_frame(raw)
    served = _served(records)
    assert served["version"] == runs["better"].result["gate"].candidate_version
    evaluated = np.load(ctx.input_dir("evaluate") / PREDICTIONS_FILE)
    np.testing.assert_allclose(_probabilities(served), evaluated, atol=1e-5)


def test_rollback_serves_the_earlier_versions_exact_predictions(runs: dict) -> None:
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.cli.main import main
    from kiln.tasks.features.splits import TEST_RAW_FILE
    from kiln.tasks.tracking.registry import Registry

    good_version = runs["good"].result["gate"].candidate_version
    raw = pd.read_parquet(runs["good"].ctx.input_dir("build_features") / TEST_RAW_FILE)
    records = records_from_frame(raw)
    expected = load_bundle(runs["good"].ctx.input_dir("bundle")).predict_records(records)
    assert main(["models", "rollback", MODEL, "--reason", "the better model misbehaves in production"]) == 0
    assert Registry.from_settings().champion(MODEL).version == good_version
    served = _served(records)
    assert served["version"] == good_version
    assert np.array_equal(_probabilities(served).astype(np.float32), expected)
    assert Registry.from_settings().history(MODEL)[-1]["action"] == "rollback"
    assert main(["models", "rollback", MODEL, "--to", "999", "--reason", "no such version"]) == 2


def test_canary_is_judged_on_live_traffic_then_promoted(runs: dict, tmp_path: Path) -> None:
    """deploy (canary) → verify (probe traffic, judged on error rate and latency) → promote, in the same registry."""
    import yaml

    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.spec import load_spec
    from kiln.tasks.tracking.registry import Registry

    spec = yaml.safe_load(SPEC.read_text())
    spec["deployment"] = {"strategy": "canary", "canary": {"share": 0.5, "min_requests": 10, "window_s": 60},
                          "capture_share": 0.25}
    canary_spec = tmp_path / "penguins_species.yaml"
    canary_spec.write_text(yaml.safe_dump(spec))
    before = Registry.from_settings().champion(MODEL).version
    results = run_all(make_context(canary_spec, "canary", {"epochs": 20}))
    version = results["gate"].candidate_version
    assert results["gate"].passed, results["gate"].reason
    assert results["deploy"].strategy == "canary"
    verdict = results["verify"].details
    assert verdict["promote"] is True and verdict["stats"]["canary"]["requests"] >= 10
    assert (results["promote"].champion, results["promote"].previous) == (version, before)
    deployment = Endpoint.of(load_spec(canary_spec)).current()
    assert deployment.champion.version == version and deployment.canary is None
    assert deployment.capture.share == 0.25  # the spec's deployment.capture_share, kept through the promotion
    assert _served([{"bill_length_mm": 40.0, "bill_depth_mm": 18.0, "flipper_length_mm": 190.0,
                     "body_mass_g": 3800.0, "island": "Dream", "sex": "male", "year": "2008"}])["version"] == version


def test_verify_failure_restores_the_previous_deployment(runs: dict) -> None:
    """A candidate whose live answers differ from its training-side predictions is taken out again by verify."""
    from kiln.tasks.bundle.load import MANIFEST_FILE, SAMPLE_PREDICTIONS_FILE
    from kiln.tasks.pipeline import keys
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.endpoint import DeploymentFailedError, Endpoint
    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.spec import spec_named
    from kiln.tasks.steps.deploy import deploy
    from kiln.tasks.steps.verify import verify
    from kiln.tasks.storage.artifacts import file_sha256, read_json, write_json

    endpoint = Endpoint.of(spec_named(MODEL))
    before = endpoint.current()
    ctx = make_context(SPEC, "diverges", {"epochs": 20})
    run_all(ctx, until=keys.DEPLOY)
    assert endpoint.current().champion.version != before.champion.version  # the candidate is live
    deploy(ctx)  # a retried deploy still knows what the run replaced
    assert read_json(ctx.input_dir("deploy") / "report.json")["previous"]["champion"] == before.champion.to_dict()
    # What the run expects from its candidate no longer matches what the endpoint answers.
    bundle = ctx.input_dir("bundle")
    expected = np.load(bundle / SAMPLE_PREDICTIONS_FILE)
    np.save(bundle / SAMPLE_PREDICTIONS_FILE, expected[:, ::-1].copy())
    manifest = read_json(bundle / MANIFEST_FILE)
    manifest["files"][SAMPLE_PREDICTIONS_FILE] = file_sha256(bundle / SAMPLE_PREDICTIONS_FILE)
    write_json(bundle / MANIFEST_FILE, manifest)

    with pytest.raises(DeploymentFailedError, match="rolled back"):
        verify(ctx)
    assert endpoint.current().champion == before.champion
    assert _served([{"bill_length_mm": 40.0, "bill_depth_mm": 18.0, "flipper_length_mm": 190.0, "body_mass_g": 3800.0,
                     "island": "Dream", "sex": "male", "year": "2008"}])["version"] == before.champion.version


def test_deployment_none_moves_the_alias_and_leaves_the_endpoint_alone(runs: dict) -> None:
    """``deployment: none`` (the Param): the gate's winner becomes champion in the registry; nothing is served."""
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.spec import spec_named
    from kiln.tasks.tracking.registry import Registry

    served_before = _served([{"bill_length_mm": 40.0, "bill_depth_mm": 18.0, "flipper_length_mm": 190.0,
                              "body_mass_g": 3800.0, "island": "Dream", "sex": "male", "year": "2008"}])
    before = spec_named(MODEL)
    results = run_all(make_context(SPEC, "registry-only", {"epochs": 40, "deployment": "none"}))
    assert results["gate"].passed, results["gate"].reason
    assert results["deploy"].strategy == "none" and results["verify"].strategy == "none"
    version = results["gate"].candidate_version
    assert results["promote"].champion == version and Registry.from_settings().champion(MODEL).version == version
    served_after = _served([{"bill_length_mm": 40.0, "bill_depth_mm": 18.0, "flipper_length_mm": 190.0,
                             "body_mass_g": 3800.0, "island": "Dream", "sex": "male", "year": "2008"}])
    assert served_after["version"] == served_before["version"] != version
    assert before.deployment.strategy == "direct"  # the spec is unchanged; the Param chose none for this run
