"""Unit tests for the training baseline in a bundle: what export writes (profile, sample, prediction distribution,
test metrics), that bundle.json's hashes cover it, and that bundles without one still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from bundle_fixtures import copy_bundle, make_run_dirs

from kiln.tasks.bundle.baseline import (
    BASELINE_FILE,
    BASELINE_FILES,
    BASELINE_SAMPLE_FILE,
    PREDICTION_QUANTILES,
    BaselineConfig,
    BaselineError,
    load_baseline,
    prediction_summary,
    write_baseline,
)
from kiln.tasks.bundle.export import ExportConfig, export_bundle
from kiln.tasks.bundle.load import MANIFEST_FILE, BundleError, load_bundle
from kiln.tasks.features.profile import profile_parquet
from kiln.tasks.steps.evaluate import EvaluateConfig, run_evaluate
from kiln.tasks.storage.artifacts import file_sha256

PRIMARY = {"classification": "accuracy", "regression": "rmse"}


def _run(tmp_path: Path, task: str, **baseline) -> tuple[Path, BaselineConfig]:
    """Run folders as the steps leave them (features, model, evaluate), and a baseline config on them."""
    features, model = make_run_dirs(tmp_path, task)
    evaluate = tmp_path / "evaluate"
    evaluate.mkdir()
    result = run_evaluate(EvaluateConfig(task=task, primary_metric=PRIMARY[task]), features, model, evaluate)
    metrics = {k.removeprefix("test/"): v for k, v in result.metrics.items()}
    # make_run_dirs' clean.parquet holds the raw rows with the label: the snapshot stands in for it here.
    config = BaselineConfig(rows_path=tmp_path / "clean" / "clean.parquet",
                            predictions_path=evaluate / "test_predictions.npy", metrics=metrics,
                            primary_metric=PRIMARY[task], seed=7, **baseline)
    return features, config


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, tuple[Path, BaselineConfig]]:
    """Per task, a bundle exported with its baseline, and the baseline's config."""
    out = {}
    for task in ("classification", "regression"):
        tmp = tmp_path_factory.mktemp(task)
        features, config = _run(tmp, task)
        export_bundle(ExportConfig(features, tmp / "model", baseline=config), tmp / "bundle")
        out[task] = (tmp / "bundle", config)
    return out


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_baseline_summarises_training_rows_test_predictions_and_metrics(bundles, task):
    bundle_dir, config = bundles[task]

    baseline = load_baseline(bundle_dir)

    bundle = load_bundle(bundle_dir)  # the bundle with its baseline still loads, every hash checked
    assert baseline is not None
    full = profile_parquet(config.rows_path)
    assert list(baseline.profile.columns) == bundle.input_columns == ["a", "b", "kind", "year"]
    assert baseline.profile.rows == full.rows == 60
    assert baseline.profile.columns["a"] == full.columns["a"] and baseline.profile.missing_share("a") > 0
    assert baseline.profile.columns["kind"].categories == full.columns["kind"].categories
    predictions = np.load(config.predictions_path)
    if task == "classification":
        counts = np.bincount(predictions.argmax(axis=1), minlength=3) / len(predictions)
        shares = dict(zip(bundle.classes, counts.tolist(), strict=True))
        assert baseline.predictions == {"kind": "classes", "shares": shares}
        assert list(baseline.predictions["shares"]) == ["cat", "dog", "eel"]
    else:
        quantiles = baseline.predictions["quantiles"]
        assert baseline.predictions["kind"] == "numeric" and len(quantiles) == len(PREDICTION_QUANTILES) == 11
        assert quantiles[0] == pytest.approx(predictions.min()) and quantiles[-1] == pytest.approx(predictions.max())
        assert quantiles == sorted(quantiles) and baseline.predictions["mean"] == pytest.approx(predictions.mean())
    assert baseline.metrics == {"primary": PRIMARY[task], "value": config.metrics[PRIMARY[task]],
                                "all": config.metrics}
    assert baseline.sample_rows == 60 and baseline.sample().shape == (60, 4)  # fewer rows than the limit: all


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_bundle_json_covers_the_baseline_and_an_altered_one_is_refused(bundles, task, tmp_path):
    bundle_dir, _ = bundles[task]
    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    assert {name: manifest["files"][name] for name in BASELINE_FILES} == {
        name: file_sha256(bundle_dir / name) for name in BASELINE_FILES}
    copy = copy_bundle(bundle_dir, tmp_path)
    sample = pd.read_parquet(copy / BASELINE_SAMPLE_FILE)
    sample.assign(a=sample["a"] + 1).to_parquet(copy / BASELINE_SAMPLE_FILE)

    with pytest.raises(BundleError, match=f"{BASELINE_SAMPLE_FILE} does not match its sha256"):
        load_bundle(copy)
    with pytest.raises(BaselineError, match=f"{BASELINE_SAMPLE_FILE} does not match its sha256"):
        load_baseline(copy)
    (copy / BASELINE_FILE).unlink()
    with pytest.raises(BundleError, match=f"lacks {BASELINE_FILE}"):
        load_bundle(copy)
    with pytest.raises(BaselineError, match=f"lacks {BASELINE_FILE}, which bundle.json lists"):
        load_baseline(copy)


def test_a_bundle_without_a_baseline_loads_and_has_none(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    bundle_dir = export_bundle(ExportConfig(features, model), tmp_path / "bundle").bundle_dir

    assert load_baseline(bundle_dir) is None
    assert not set(BASELINE_FILES) & set(json.loads((bundle_dir / MANIFEST_FILE).read_text())["files"])
    load_bundle(bundle_dir)
    # A baseline copied in after the export is not trusted, and does not stop the bundle from serving.
    (bundle_dir / BASELINE_FILE).write_text("{}")
    (bundle_dir / BASELINE_SAMPLE_FILE).write_bytes(b"")
    with pytest.raises(BaselineError, match="bundle.json does not list \\(added after the export\\)"):
        load_baseline(bundle_dir)
    load_bundle(bundle_dir)


def test_the_sample_is_seeded_bounded_and_made_of_the_rows(tmp_path):
    """Across several record batches: at most ``sample_rows`` distinct rows of the file, the same for the same
    seed; the profile is the whole file's."""
    n = 150_000
    rng = np.random.default_rng(0)
    rows = pd.DataFrame({"id": np.arange(n, dtype=np.float64), "x": rng.normal(size=n),
                         "c": pd.array(rng.choice(["u", "v"], n), dtype="string"), "y": rng.normal(size=n)})
    rows.to_parquet(tmp_path / "snapshot.parquet")  # with a pandas index in its metadata
    np.save(tmp_path / "p.npy", rng.normal(size=50).astype(np.float32))

    def sample(seed: int, name: str) -> pd.DataFrame:
        out = tmp_path / name
        out.mkdir()
        config = BaselineConfig(tmp_path / "snapshot.parquet", tmp_path / "p.npy", {"rmse": 0.5}, "rmse", seed)
        content = write_baseline(config, out, ["id", "x", "c"], None)
        assert content["sample_rows"] == 5_000 and content["profile"]["rows"] == n
        assert list(content["profile"]["columns"]) == ["id", "x", "c"]
        return pd.read_parquet(out / BASELINE_SAMPLE_FILE)

    first, again, other = sample(1, "a"), sample(1, "b"), sample(2, "c")
    assert list(first.columns) == ["id", "x", "c"] and first["id"].is_unique
    pd.testing.assert_frame_equal(first, again)
    assert not first["id"].equals(other["id"])
    ids = first["id"].to_numpy().astype(int)
    assert ids.max() > 65_536  # rows from later record batches too
    expected = rows.iloc[ids][["id", "x", "c"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, expected)


def test_a_given_profile_is_reused_without_its_reference_counts(tmp_path):
    """``validate``'s profile (counted against the accepted one) is the snapshot's: reused, counts dropped."""
    features, config = _run(tmp_path, "classification")
    reference = profile_parquet(config.rows_path)
    validated = profile_parquet(config.rows_path, reference=reference)
    assert validated.columns["a"].out_of_range == 0

    out = tmp_path / "b1"
    out.mkdir()
    content = write_baseline(BaselineConfig(**{**config.__dict__, "profile": validated}), out, ["a", "kind"],
                             ["cat", "dog", "eel"])

    assert content["profile"]["reference"] is None and "out_of_range" not in content["profile"]["columns"]["a"]
    assert content["profile"]["columns"]["a"] == reference.columns["a"].to_dict()
    other = profile_parquet(features / "test_raw.parquet")  # a profile of other rows is refused
    with pytest.raises(BaselineError, match="is not the profile of"):
        write_baseline(BaselineConfig(**{**config.__dict__, "profile": other}), out, ["a"], ["cat", "dog", "eel"])


@pytest.mark.parametrize(("predictions", "classes", "match"), [
    (np.ones((4, 2)), ["a", "b", "c"], r"shape \[4, 2\], expected \[n, 3\]"),
    (np.ones(4), ["a", "b"], r"shape \[4\], expected \[n, 2\]"),
    (np.ones((4, 2)), None, r"expected \[n\]"),
    (np.ones(0), None, "n >= 1"),
    (np.array([1.0, np.nan]), None, "NaN or infinite"),
], ids=["classes", "not-probabilities", "not-values", "empty", "nan"])
def test_predictions_that_do_not_fit_are_refused(predictions, classes, match):
    with pytest.raises(BaselineError, match=match):
        prediction_summary(predictions, classes)


def test_bad_configs_and_files_are_refused(bundles, tmp_path):
    with pytest.raises(BaselineError, match="primary_metric 'f1_macro' is not among the test metrics"):
        BaselineConfig(tmp_path / "r", tmp_path / "p", {"accuracy": 0.9}, "f1_macro", 0)
    with pytest.raises(BaselineError, match="sample_rows must be an integer >= 1"):
        BaselineConfig(tmp_path / "r", tmp_path / "p", {"accuracy": 0.9}, "accuracy", 0, sample_rows=0)
    bundle_dir, config = bundles["classification"]
    with pytest.raises(BaselineError, match=r"lacks the input column\(s\) \['nope'\]"):
        write_baseline(config, tmp_path, ["a", "nope"], ["cat", "dog", "eel"])
    with pytest.raises(FileNotFoundError, match="run ingest and evaluate"):
        write_baseline(BaselineConfig(**{**config.__dict__, "rows_path": tmp_path / "none.parquet"}), tmp_path,
                       ["a"], ["cat", "dog", "eel"])
    copy = copy_bundle(bundle_dir, tmp_path)
    content = json.loads((copy / BASELINE_FILE).read_text())
    (copy / BASELINE_FILE).write_text(json.dumps({**content, "format": 2}))
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["files"][BASELINE_FILE] = file_sha256(copy / BASELINE_FILE)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BaselineError, match="has format 2; this code reads format 1"):
        load_baseline(copy)
