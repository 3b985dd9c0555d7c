"""The model registry over a real MLflow store (SQLite): versions per run as MLflow Models, the champion alias and its
history, and the bundle fetched back from a version."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from synthetic import write_run_dirs

from kiln.tasks.bundle.export import ExportConfig, export_bundle
from kiln.tasks.bundle.load import MANIFEST_FILE, load_bundle
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.features.splits import TEST_RAW_FILE
from kiln.tasks.tracking.pyfunc_model import code_closure
from kiln.tasks.tracking.registry import BUNDLE_ARTIFACT_PATH, CHAMPION, RUN_KEY_TAG, Registry, RegistryError


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per task, a bundle of an untrained network on a table with nulls, text and integer categories."""
    rng = np.random.default_rng(0)
    n = 60
    out = {}
    for task in ("classification", "regression"):
        df = pd.DataFrame({"a": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)), "b": rng.normal(size=n),
                           "kind": pd.array(rng.choice(["p", "q", None], n), dtype="string"),
                           "year": rng.choice([2007, 2008, 2009], n)})
        df["y"] = pd.array(["cat", "dog", "eel"] * (n // 3), dtype="string") if task == "classification" \
            else 2 * df["b"]
        types = {"a": "numeric", "b": "numeric", "kind": "categorical", "year": "categorical",
                 "y": "categorical" if task == "classification" else "numeric"}
        tmp = tmp_path_factory.mktemp(task)
        features, model = write_run_dirs(tmp, df, types, task)
        out[task] = export_bundle(ExportConfig(features, model), tmp / "bundle").bundle_dir
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One SQLite store for the module (creating one takes seconds); each test registers a model of its own name."""
    return Registry(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture()
def m(request: pytest.FixtureRequest) -> str:
    """This test's model name."""
    return re.sub(r"\W", "_", request.node.name)


def _run(registry: Registry, tmp_path: Path, name: str) -> str:
    client = registry.client
    exp = client.get_experiment_by_name(name) or None
    exp_id = exp.experiment_id if exp else client.create_experiment(name, (tmp_path / "art").as_uri())
    return client.create_run(exp_id).info.run_id


def _register(registry: Registry, tmp_path: Path, name: str, run_key: str, bundle: Path) -> str:
    tags = {RUN_KEY_TAG: run_key, "kiln.data_hash": "abc"}
    return registry.register(name, _run(registry, tmp_path, name), bundle, tags).version


def test_register_is_idempotent_per_run(registry: Registry, tmp_path: Path, m: str, bundles) -> None:
    v1 = _register(registry, tmp_path, m, "m/run1", bundles["classification"])
    again = registry.register(m, registry.version(m, v1).run_id, bundles["classification"],
                              {RUN_KEY_TAG: "m/run1"})
    assert again.version == v1
    assert [v.version for v in registry.versions(m)] == [v1]
    assert registry.version(m, v1).tags["kiln.data_hash"] == "abc"


def test_a_retry_reuses_the_model_a_cut_short_try_logged(registry: Registry, tmp_path: Path, m: str,
                                                         bundles) -> None:
    run_id = _run(registry, tmp_path, m)
    tags = {RUN_KEY_TAG: "m/run1"}
    registry.client.create_registered_model(m)
    left = registry._logged_model(m, run_id, bundles["classification"], tags)  # the try ended here

    version = registry.register(m, run_id, bundles["classification"], tags)

    assert version.model_id == left.model_id
    experiment = registry.client.get_run(run_id).info.experiment_id
    assert [m.model_id for m in registry.client.search_logged_models([experiment])] == [left.model_id]


def test_champion_moves_are_recorded_and_rolled_back(registry: Registry, tmp_path: Path, m: str, bundles) -> None:
    v1, v2, v3 = (_register(registry, tmp_path, m, f"m/run{i}", bundles["classification"]) for i in (1, 2, 3))
    assert registry.champion(m) is None
    assert registry.set_champion(m, v1, action="gate", reason="first", actor="t") is None
    assert registry.set_champion(m, v2, action="gate", reason="better", actor="t").version == v1
    assert registry.rollback_target(m) == v1
    registry.set_champion(m, v3, action="approve", reason="by hand", actor="t")
    assert registry.rollback_target(m) == v2
    registry.set_champion(m, v2, action="rollback", reason="v3 bad", actor="t")
    assert registry.champion(m).version == v2 and CHAMPION in registry.champion(m).aliases
    history = registry.history(m)
    assert [(h["version"], h["previous"], h["action"]) for h in history] == [
        (v1, None, "gate"), (v2, v1, "gate"), (v3, v2, "approve"), (v2, v3, "rollback")]
    # Rolling back again goes further back (to v1), not forth to the version just rolled back from.
    assert registry.rollback_target(m) == v1


def test_fetch_bundle_copies_the_versions_bundle_once(registry: Registry, tmp_path: Path, m: str, bundles) -> None:
    bundle = bundles["classification"]
    v1 = _register(registry, tmp_path, m, "m/run1", bundle)
    cache = tmp_path / "cache"
    got = registry.fetch_bundle(registry.version(m, v1), cache)
    assert got == cache / f"v{v1}"
    assert (got / MANIFEST_FILE).read_bytes() == (bundle / MANIFEST_FILE).read_bytes()
    assert load_bundle(got).input_columns == load_bundle(bundle).input_columns
    assert registry.fetch_bundle(registry.version(m, v1), cache) == got


def test_a_version_whose_source_is_a_bare_bundle_is_still_fetched(registry: Registry, tmp_path: Path, m: str,
                                                                  bundles) -> None:
    """Versions registered before kiln logged MLflow Models stay servable (rollback to them works)."""
    run_id = _run(registry, tmp_path, m)
    client = registry.client
    client.create_registered_model(m)
    client.log_artifacts(run_id, str(bundles["classification"]), artifact_path=BUNDLE_ARTIFACT_PATH)
    source = f"{client.get_run(run_id).info.artifact_uri}/{BUNDLE_ARTIFACT_PATH}"
    old = client.create_model_version(m, source, run_id=run_id, tags={RUN_KEY_TAG: "m/old"})

    got = registry.fetch_bundle(registry.version(m, old.version), tmp_path / "cache")

    assert (got / MANIFEST_FILE).read_bytes() == (bundles["classification"] / MANIFEST_FILE).read_bytes()


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_version_is_an_mlflow_model_that_answers_as_the_server(registry: Registry, tmp_path: Path, m: str,
                                                                 bundles, task: str) -> None:
    bundle_dir = bundles[task]
    version = registry.version(m, _register(registry, tmp_path, m, "m/run1", bundle_dir))
    model = mlflow.pyfunc.load_model(registry.client.get_model_version_download_uri(m, version.version))
    rows = pd.read_parquet(bundle_dir.parent / "features" / TEST_RAW_FILE).drop(columns=["y"])

    got = model.predict(rows)

    bundle = load_bundle(bundle_dir)
    answers = bundle.format_predictions(bundle.predict_records(records_from_frame(rows)))  # the server's body
    if task == "regression":
        assert list(got.columns) == ["value"]
        np.testing.assert_allclose(got["value"], [a["value"] for a in answers], rtol=0, atol=1e-6)
    else:
        assert list(got.columns) == ["label", "p_cat", "p_dog", "p_eel"]
        assert got["label"].tolist() == [a["label"] for a in answers]
        np.testing.assert_allclose(got[["p_cat", "p_dog", "p_eel"]],
                                   [[a["probabilities"][c] for c in ("cat", "dog", "eel")] for a in answers],
                                   rtol=0, atol=1e-6)
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["a", "b", "kind", "year"]
    assert signature.outputs.input_names() == list(got.columns)


def test_missing_input_columns_are_named(registry: Registry, tmp_path: Path, m: str, bundles) -> None:
    bundle_dir = bundles["classification"]
    version = registry.version(m, _register(registry, tmp_path, m, "m/run1", bundle_dir))
    model = mlflow.pyfunc.load_model(registry.client.get_model_version_download_uri(m, version.version))
    rows = pd.read_parquet(bundle_dir.parent / "features" / TEST_RAW_FILE).drop(columns=["y", "kind", "b"])

    with pytest.raises(Exception, match=r"missing inputs.*'b'.*'kind'"):
        model.predict(rows)  # MLflow's schema check
    with pytest.raises(ValueError, match=r"lacks the column\(s\) b, kind; the model takes the raw columns a, b, "):
        model.unwrap_python_model().predict(None, rows)  # kiln's own, for callers that skip MLflow's


def test_the_model_ships_only_the_loaders_part_of_kiln() -> None:
    shipped = code_closure()
    assert {"kiln/tasks/bundle/load.py", "kiln/tasks/features/records.py", "kiln/tasks/serving/inputs.py"} <= set(
        shipped)
    assert [f for f in shipped if f.startswith(("kiln/tasks/training", "kiln/tasks/spec", "kiln/tasks/steps",
                                                "kiln/tasks/pipeline", "kiln/tasks/tracking"))] == []


@pytest.mark.parametrize("call, message", [
    (lambda r, m: r.version(m, "99"), "no version '99'"),
    (lambda r, m: r.rollback_target(m), "no earlier champion"),
    (lambda r, m: r.rollback_target("nope"), "no champion to roll back from"),
], ids=["unknown-version", "nothing-earlier", "no-champion"])
def test_errors_name_the_problem(registry: Registry, tmp_path: Path, m: str, bundles, call, message: str) -> None:
    v1 = _register(registry, tmp_path, m, "m/run1", bundles["classification"])
    registry.set_champion(m, v1, action="gate", reason="first", actor="t")
    with pytest.raises(RegistryError, match=message):
        call(registry, m)


def test_another_host_serves_what_the_store_records(registry: Registry, tmp_path: Path, m: str, bundles,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A deploy on host A records its deployment in the store; host B (no deployment file) writes its own from the
    record, with the registry's bundles in its own cache, and only when the record is newer."""
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.pipeline.served import materialise, publish_served, read_served
    from kiln.tasks.serving.deployment import Deployment, ModelRef, read_deployment, with_canary
    from kiln.tasks.storage.artifacts import LocalArtifactStore
    from kiln.tasks.tracking.registry import RegistryError

    v1, v2 = (_register(registry, tmp_path, m, f"m/run{i}", bundles["classification"]) for i in (1, 2))
    store = LocalArtifactStore(tmp_path / "store")
    on_a = with_canary(Deployment(m, ModelRef(v1, "/host-a/bundles/v1")), ModelRef(v2, "/host-a/bundles/v2"), 0.2)
    publish_served(store, m, on_a)
    monkeypatch.setenv("KILN_SERVING_DIR", str(tmp_path / "host-b"))
    endpoint = Endpoint(m, "127.0.0.1", 1, tmp_path / "host-b" / m)

    got = materialise(endpoint, store, registry)
    assert got is not None and (got.champion.version, got.canary.version, got.canary.share) == (v1, v2, 0.2)
    for bundle in (got.champion.bundle, got.canary.bundle):
        assert Path(bundle).is_relative_to(tmp_path / "host-b") and (Path(bundle) / MANIFEST_FILE).is_file()
    assert read_deployment(endpoint.deployment) == got
    assert materialise(endpoint, store, registry) is None  # the local file is current

    publish_served(store, m, None)  # a rollback to nothing on host A
    assert read_served(store, m)["deployment"] is None and materialise(endpoint, store, registry) is None

    later = "2999-01-01T00:00:00Z"  # a deploy after the one served here
    publish_served(store, m, Deployment(m, ModelRef("99", "/host-a/bundles/v99"), updated_at=later))
    with pytest.raises(RegistryError, match=rf"no version '99' \(versions: {v1}, {v2}\)"):
        materialise(endpoint, store, registry)
    assert read_deployment(endpoint.deployment) == got  # the failed refresh left the local file as it was
