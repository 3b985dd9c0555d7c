"""The model registry over a real MLflow store (SQLite): versions per run, the champion alias and its history."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.tasks.tracking.registry import CHAMPION, RUN_KEY_TAG, Registry, RegistryError


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _register(registry: Registry, tmp_path: Path, run_key: str) -> str:
    client = registry.client
    exp = client.get_experiment_by_name("m") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("m", (tmp_path / "art").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    bundle = tmp_path / f"bundle-{run_key.replace('/', '_')}"
    bundle.mkdir()
    (bundle / "model.ts").write_text(run_key)
    return registry.register("m", run_id, bundle, {RUN_KEY_TAG: run_key, "kiln.data_hash": "abc"}).version


def test_register_is_idempotent_per_run(registry: Registry, tmp_path: Path) -> None:
    v1 = _register(registry, tmp_path, "m/run1")
    again = registry.register("m", registry.version("m", v1).run_id, tmp_path / "bundle-m_run1",
                              {RUN_KEY_TAG: "m/run1"})
    assert again.version == v1
    assert [v.version for v in registry.versions("m")] == [v1]
    assert registry.version("m", v1).tags["kiln.data_hash"] == "abc"


def test_champion_moves_are_recorded_and_rolled_back(registry: Registry, tmp_path: Path) -> None:
    v1, v2, v3 = (_register(registry, tmp_path, f"m/run{i}") for i in (1, 2, 3))
    assert registry.champion("m") is None
    assert registry.set_champion("m", v1, action="gate", reason="first", actor="t") is None
    assert registry.set_champion("m", v2, action="gate", reason="better", actor="t").version == v1
    assert registry.rollback_target("m") == v1
    registry.set_champion("m", v3, action="approve", reason="by hand", actor="t")
    assert registry.rollback_target("m") == v2
    registry.set_champion("m", v2, action="rollback", reason="v3 bad", actor="t")
    assert registry.champion("m").version == v2 and CHAMPION in registry.champion("m").aliases
    history = registry.history("m")
    assert [(h["version"], h["previous"], h["action"]) for h in history] == [
        (v1, None, "gate"), (v2, v1, "gate"), (v3, v2, "approve"), (v2, v3, "rollback")]
    # Rolling back again goes further back (to v1), not forth to the version just rolled back from.
    assert registry.rollback_target("m") == v1


def test_fetch_bundle_copies_the_version_once(registry: Registry, tmp_path: Path) -> None:
    v1 = _register(registry, tmp_path, "m/run1")
    cache = tmp_path / "cache"
    got = registry.fetch_bundle(registry.version("m", v1), cache)
    assert got == cache / f"v{v1}" and (got / "model.ts").read_text() == "m/run1"
    assert registry.fetch_bundle(registry.version("m", v1), cache) == got


@pytest.mark.parametrize("call, message", [
    (lambda r: r.version("m", "99"), "no version '99'"),
    (lambda r: r.rollback_target("m"), "no earlier champion"),
    (lambda r: r.rollback_target("nope"), "no champion to roll back from"),
], ids=["unknown-version", "nothing-earlier", "no-champion"])
def test_errors_name_the_problem(registry: Registry, tmp_path: Path, call, message: str) -> None:
    v1 = _register(registry, tmp_path, "m/run1")
    registry.set_champion("m", v1, action="gate", reason="first", actor="t")
    with pytest.raises(RegistryError, match=message):
        call(registry)
