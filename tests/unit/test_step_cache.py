"""The step cache on the data steps (real ingest, validate, clean and build_features in this process, a local
store): a repeated key reuses the earlier run's output without running the step; any changed input misses."""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from cache_fixtures import DATA_STEPS, Counted, run_data_steps

from kiln.tasks.pipeline import cache_keys, keys
from kiln.tasks.pipeline.accepted import read_accepted
from kiln.tasks.pipeline.context import RunContext, make_context
from kiln.tasks.pipeline.step_cache import CACHE_DIR, entry_key, run_step
from kiln.tasks.pipeline.steps import step_named
from kiln.tasks.steps import validate as validate_module
from kiln.tasks.steps.validate import DataValidationError
from kiln.tasks.storage.artifacts import LocalArtifactStore, read_json

#: With ``validate`` (a Great Expectations run, about a second): only where the test is about it.
WITH_VALIDATE = (keys.INGEST, keys.VALIDATE, keys.CLEAN, keys.BUILD_FEATURES)


def write_pipeline(folder: Path, **spec: Any) -> Path:
    """A 120-row CSV with a missing value in ``x`` and its spec; returns the spec file."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.normal(size=120).round(3), "kind": rng.choice(["a", "b", "c"], size=120),
                       "y": rng.choice(["p", "q"], size=120)})
    df.loc[3, "x"] = None
    df.to_csv(folder / "data.csv", index=False)
    path = folder / "cached.yaml"
    path.write_text(yaml.safe_dump({"name": "cached", "source": {"uri": "data.csv"}, "target": "y",
                                    "task": "classification", **spec}))
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "store")


def test_rerun_with_other_epochs_reuses_every_data_step(tmp_path: Path, store: LocalArtifactStore,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    spec, counted = write_pipeline(tmp_path), Counted()
    first = run_data_steps(spec, "manual__1", store, counted, WITH_VALIDATE, epochs=2)
    assert counted.calls == list(WITH_VALIDATE)
    assert all(r["cache"].startswith("miss: ") and r["peak_rss_mib"] > 0 for r in first.values())
    assert read_accepted(store, "cached").run_key == "cached/manual__1"

    with caplog.at_level(logging.INFO, logger="kiln.tasks.pipeline.step_cache"):
        second = run_data_steps(spec, "manual__2", store, counted, WITH_VALIDATE, epochs=5)
    assert counted.calls == list(WITH_VALIDATE), "no data step ran again"
    for name in WITH_VALIDATE:
        key = first[name]["cache"].removeprefix("miss: ")
        if name == keys.VALIDATE:
            # The accepted profile is a part of validate's key: the first run had none, the second has the first
            # run's; the first run recorded its output under both.
            key = validate_key_after(first[name], store)
        assert second[name]["cache"] == f"hit: {key} from run manual__1"
        assert f"cache hit: {key} from run manual__1" in caplog.text
        old, new = store.path(f"cached/manual__1/{name}"), store.path(f"cached/manual__2/{name}")
        files = sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
        assert all(os.path.samefile(old / f, new / f) for f in files), "hard links, not copies"
    # The result names this run's output, not the earlier run's.
    assert second[keys.CLEAN]["report_file"] == str(store.path("cached/manual__2/clean") / keys.CLEAN_REPORT_FILE)
    assert {k: v for k, v in second[keys.CLEAN].items() if k not in ("cache", "peak_rss_mib", "report_file")} == \
        {k: v for k, v in first[keys.CLEAN].items() if k not in ("cache", "peak_rss_mib", "report_file")}
    # validate's hit still does what validate does to its run: this run's snapshot is the accepted one, and the
    # report is on this run's MLflow run.
    assert second[keys.VALIDATE]["success"] is True
    assert second[keys.VALIDATE]["report_file"] == str(store.path("cached/manual__2/validate") / keys.VALIDATION_FILE)
    accepted = read_accepted(store, "cached")
    assert accepted.run_key == "cached/manual__2"
    assert accepted.profile == read_json(store.path("cached/manual__2/validate") / "profile.json")
    assert validation_artifacts(make_context(spec, "manual__2", store=store)) >= {"validation/validation.json",
                                                                                  "validation/profile.json"}


def validate_key_after(result: dict[str, Any], store: LocalArtifactStore) -> str:
    """The key of validate's other entry recorded by the run that returned ``result``: the next run's key."""
    missed = result["cache"].removeprefix("miss: ")
    (other,) = [p.name for p in store.path(f"cached/{CACHE_DIR}/validate").iterdir() if p.name != missed]
    entry = read_json(store.path(f"cached/{CACHE_DIR}/validate/{other}") / "entry.json")
    assert entry["parts"]["accepted"] is not None and entry["parts"]["accepted"] != \
        read_json(store.path(f"cached/{CACHE_DIR}/validate/{missed}") / "entry.json")["parts"]["accepted"]
    return other


def validation_artifacts(ctx: RunContext) -> set[str]:
    """The files logged under ``validation/`` of the run's MLflow run."""
    from mlflow.tracking import MlflowClient

    from kiln.tasks.settings import get_settings

    client = MlflowClient(get_settings().mlflow_tracking_uri)
    return {a.path for a in client.list_artifacts(ctx.mlflow_run(), keys.MLFLOW_VALIDATION_PATH)}


def test_changed_expectations_field_misses_validate(tmp_path: Path, store: LocalArtifactStore) -> None:
    spec, counted = write_pipeline(tmp_path), Counted()
    steps = (keys.INGEST, keys.VALIDATE)
    first = run_data_steps(spec, "manual__1", store, counted, steps)
    second = run_data_steps(write_pipeline(tmp_path, expectations={"min_rows": 11}), "manual__2", store, counted,
                            steps)
    assert counted.calls == [*steps, keys.VALIDATE]
    assert second[keys.INGEST]["cache"].startswith("hit: ")
    assert second[keys.VALIDATE]["cache"].startswith("miss: ") and \
        second[keys.VALIDATE]["cache"] != first[keys.VALIDATE]["cache"]


def test_a_class_the_champion_never_saw_misses_and_fails(tmp_path: Path, store: LocalArtifactStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The key holds the snapshot's classes the champion never saw: no champion and a champion that saw every class
    share a key; a champion that lacks a class of the snapshot misses, fails and records nothing."""
    spec, counted = write_pipeline(tmp_path), Counted()
    steps = (keys.INGEST, keys.VALIDATE)

    def validate_with(champion: tuple[str, ...] | None, run_id: str) -> dict[str, Any]:
        monkeypatch.setattr(validate_module, "champion_classes", lambda ctx: champion)
        return run_data_steps(spec, run_id, store, counted, steps)[keys.VALIDATE]

    after_first = validate_key_after(validate_with(("p", "q"), "manual__1"), store)
    assert validate_with(None, "manual__2")["cache"] == f"hit: {after_first} from run manual__1"
    assert validate_with(("p", "q", "r"), "manual__3")["cache"] == f"hit: {after_first} from run manual__1"
    with pytest.raises(DataValidationError, match="expect_column_values_to_be_in_set column 'y'"):
        validate_with(("p",), "manual__4")
    assert counted.calls == [*steps, keys.VALIDATE], "only the first and the last validate ran"
    ctx = make_context(spec, "manual__4", store=store)
    key = step_named(keys.VALIDATE).cache_key(ctx)
    assert key.parts["new_classes"] == ["q"]
    assert not store.exists(entry_key(ctx, key)), "a failed validation is never recorded"
    assert read_accepted(store, "cached").run_key == "cached/manual__3", "the failed run was not accepted"
    assert len(list(store.path(f"cached/{CACHE_DIR}/validate").iterdir())) == 2, \
        "the passed run's key and the key of the next run on the snapshot it made the accepted one"


def test_cache_off_always_recomputes(tmp_path: Path, store: LocalArtifactStore) -> None:
    spec, counted = write_pipeline(tmp_path), Counted()
    run_data_steps(spec, "manual__1", store, counted)
    for run_id, params in (("manual__2", {"use_cache": False}), ("manual__3", {"use_cache": False})):
        results = run_data_steps(spec, run_id, store, counted, **params)
        assert all(r["cache"] == "off" for r in results.values())
    assert counted.calls == list(DATA_STEPS) * 3
    off_in_spec = write_pipeline(tmp_path, cache={"enabled": False})
    assert make_context(off_in_spec, "x", store=store).spec.cache.enabled is False


def test_changed_source_byte_misses_from_ingest_on(tmp_path: Path, store: LocalArtifactStore) -> None:
    spec, counted = write_pipeline(tmp_path), Counted()
    first = run_data_steps(spec, "manual__1", store, counted)
    data = tmp_path / "data.csv"
    raw = bytearray(data.read_bytes())
    at = raw.index(b"\n", raw.index(b"\n") + 1) - 1  # the last character of the first data row (its label)
    raw[at:at + 1] = b"q" if raw[at:at + 1] == b"p" else b"p"
    data.write_bytes(bytes(raw))
    second = run_data_steps(spec, "manual__2", store, counted)
    assert counted.calls == list(DATA_STEPS) * 2
    assert all(second[n]["cache"].startswith("miss: ") and second[n]["cache"] != first[n]["cache"]
               for n in DATA_STEPS)


def test_changed_cleaning_field_misses_from_clean_on(tmp_path: Path, store: LocalArtifactStore) -> None:
    spec, counted = write_pipeline(tmp_path), Counted()
    run_data_steps(spec, "manual__1", store, counted)
    changed = write_pipeline(tmp_path, cleaning={"default_numeric": {"missing": "mean"}})
    second = run_data_steps(changed, "manual__2", store, counted)
    assert counted.calls == [*DATA_STEPS, *DATA_STEPS[1:]]
    assert second[keys.INGEST]["cache"].startswith("hit: ")
    assert second[keys.CLEAN]["cache"].startswith("miss: ")
    assert second[keys.BUILD_FEATURES]["cache"].startswith("miss: "), "clean's output changed (a mean, not a median)"


def test_changed_line_of_step_code_misses(tmp_path: Path, store: LocalArtifactStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    origin = importlib.util.find_spec("kiln.tasks.steps.clean").origin
    copy = tmp_path / "code" / "kiln_cache_test_clean.py"
    copy.parent.mkdir()
    copy.write_text(Path(origin).read_text())
    monkeypatch.syspath_prepend(str(copy.parent))
    monkeypatch.setitem(cache_keys.CODE_MODULES, keys.CLEAN,
                        ("kiln_cache_test_clean", *cache_keys.CODE_MODULES[keys.CLEAN][1:]))
    spec, counted = write_pipeline(tmp_path), Counted()
    first = run_data_steps(spec, "manual__1", store, counted)
    assert run_data_steps(spec, "manual__2", store, counted)[keys.CLEAN]["cache"].startswith("hit: ")

    line = "log = logging.getLogger(__name__)"
    assert line in copy.read_text()
    copy.write_text(copy.read_text().replace(line, 'log = logging.getLogger(__name__ + ".changed")', 1))
    third = run_data_steps(spec, "manual__3", store, counted)
    assert third[keys.INGEST]["cache"].startswith("hit: ")
    assert third[keys.CLEAN]["cache"].startswith("miss: ") and third[keys.CLEAN]["cache"] != first[keys.CLEAN]["cache"]
    assert counted.calls == [*DATA_STEPS, keys.CLEAN]


def test_hit_whose_output_is_gone_is_a_miss(tmp_path: Path, store: LocalArtifactStore,
                                            caplog: pytest.LogCaptureFixture) -> None:
    spec, counted = write_pipeline(tmp_path), Counted()
    run_data_steps(spec, "manual__1", store, counted)
    (store.path("cached/manual__1/clean") / keys.CLEAN_FILE).unlink()
    shutil.rmtree(store.path("cached/manual__1/build_features"))
    with caplog.at_level(logging.INFO, logger="kiln.tasks.pipeline.step_cache"):
        second = run_data_steps(spec, "manual__2", store, counted)
    assert counted.calls == [*DATA_STEPS, keys.CLEAN, keys.BUILD_FEATURES]
    assert second[keys.CLEAN]["cache"].startswith("miss: ")
    assert "no longer holds the files it recorded" in caplog.text and "is gone" in caplog.text
    ctx = make_context(spec, "manual__2", store=store)
    entry = store.path(entry_key(ctx, step_named(keys.CLEAN).cache_key(ctx))) / "entry.json"
    assert read_json(entry)["run_key"] == "cached/manual__2", "the entry now names the output that exists"


def test_sql_source_and_train_without_cache_train_are_not_cached(tmp_path: Path, store: LocalArtifactStore) -> None:
    ctx = make_context(write_pipeline(tmp_path), "manual__1", store=store)
    assert step_named(keys.TRAIN).cache_key(ctx) is None, "train is cached only with cache.train"
    sql = ctx.spec.model_copy(update={"source": ctx.spec.source.model_copy(
        update={"uri": None, "sql": {"conn_id": "db", "query": "select 1"}})})
    assert step_named(keys.INGEST).cache_key(replace(ctx, spec=sql)) is None


def test_code_modules_cover_the_kiln_code_each_step_uses() -> None:
    """Every kiln module a cached step's listed code imports (steps, features, sources, training) is listed too, so
    a change there changes the step's code version."""
    libraries = ("kiln.tasks.steps", "kiln.tasks.features", "kiln.tasks.sources", "kiln.tasks.training")
    for step, modules in cache_keys.CODE_MODULES.items():
        listed = set(modules)
        for module in modules:
            for _, path in cache_keys._module_files(module):
                for name in _kiln_imports(path):
                    if name.startswith(libraries):
                        assert any(name == m or name.startswith(m + ".") for m in listed), \
                            f"{step}: {path.name} imports {name}, missing from CODE_MODULES[{step!r}]"


def _kiln_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kiln."):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if importlib.util.find_spec(node.module) and _is_module(f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kiln."))
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_source_changed_while_read_is_not_recorded(tmp_path: Path, store: LocalArtifactStore,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The key's listing is taken before ingest reads: a source that changes in between must not leave its
    snapshot under the key of the listing before the change."""
    spec, counted = write_pipeline(tmp_path), Counted()
    ingest = step_named(keys.INGEST)

    def changing(ctx: RunContext) -> Any:
        (tmp_path / "data.csv").write_text("x,kind,y\n1.0,a,p\n" * 20)
        return ingest.run(ctx)

    ctx = make_context(spec, "manual__1", store=store)
    result = run_step(replace(ingest, run=changing), ctx)
    key = result["cache"].removeprefix("miss: ")
    assert not store.exists(f"cached/_cache/ingest/{key}")
    assert run_data_steps(write_pipeline(tmp_path), "manual__2", store, counted)[keys.INGEST]["cache"] != \
        f"hit: {key} from run manual__1"
