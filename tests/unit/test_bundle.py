"""Unit tests for the model bundle: export, self-contained loading, train/serve parity and refused bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import write_run_dirs

from kiln.tasks.bundle.export import ExportConfig, export_bundle
from kiln.tasks.bundle.load import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    SAMPLE_FILE,
    SAMPLE_PREDICTIONS_FILE,
    SIGNATURE_FILE,
    BundleError,
    RecordError,
    load_bundle,
)
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.features.splits import TEST_RAW_FILE
from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.spec import ModelSpec
from kiln.tasks.training.networks import MODEL_FILE as TRAINED_MODEL_FILE
from kiln.tasks.training.networks import build_model, load_model, predict, save_model

PROVENANCE = {"pipeline": "penguins", "run_key": "penguins/r1", "code_version": "abc123"}


def make_run_dirs(tmp_path: Path, task: str, model_spec: ModelSpec | None = None, n: int = 60,
                  pixels: bool = False) -> tuple[Path, Path]:
    """A ``build_features`` folder and an untrained network saved as the ``train`` step would."""
    rng = np.random.default_rng(0)
    if pixels:
        df = pd.DataFrame({f"p{i}": rng.random(n) for i in range(16)})
        types = {c: "numeric" for c in df.columns}
    else:
        df = pd.DataFrame({"a": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)), "b": rng.normal(size=n),
                           "kind": pd.array(rng.choice(["p", "q", None], n), dtype="string"),
                           "year": rng.choice([2007, 2008, 2009], n)})
        types = {"a": "numeric", "b": "numeric", "kind": "categorical", "year": "categorical"}
    if task == "classification":
        df["y"] = pd.array(["cat", "dog", "eel"] * (n // 3), dtype="string")
    else:
        df["y"] = 2 * df["b"] + rng.normal(scale=0.1, size=n)
    types["y"] = "categorical" if task == "classification" else "numeric"
    return write_run_dirs(tmp_path, df, types, task, model_spec)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Per task, ``(features, model, bundle)`` folders, exported once for the module."""
    folders = {}
    for task in ("classification", "regression"):
        tmp = tmp_path_factory.mktemp(task)
        features, model = make_run_dirs(tmp, task)
        export_bundle(ExportConfig(features, model, metadata=PROVENANCE), tmp / "bundle")
        folders[task] = (features, model, tmp / "bundle")
    return folders


@pytest.fixture(params=["classification", "regression"])
def exported(request, exports) -> tuple[Path, Path, Path]:
    """The exported folders of each task in turn."""
    return exports[request.param]


def test_export_writes_every_file_and_a_manifest_with_provenance(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")

    result = export_bundle(ExportConfig(features, model, metadata=PROVENANCE), tmp_path / "bundle")

    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == sorted(
        [MANIFEST_FILE, MODEL_FILE, FEATURE_SPEC_FILE, SIGNATURE_FILE, SAMPLE_FILE, SAMPLE_PREDICTIONS_FILE])
    manifest = json.loads((tmp_path / "bundle" / MANIFEST_FILE).read_text())
    assert manifest == result.manifest
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION and manifest["metadata"] == PROVENANCE
    assert manifest["torch_version"] == torch.__version__ and manifest["model"]["input_dim"] == 9
    n_test = len(pd.read_parquet(features / TEST_RAW_FILE))
    assert result.sample_rows == n_test == 12 and 0.0 <= result.max_diff <= 1e-5
    assert json.loads(json.dumps(result.to_dict()))["bundle_dir"] == str(tmp_path / "bundle")
    signature = json.loads((tmp_path / "bundle" / SIGNATURE_FILE).read_text())
    assert signature == {"inputs": [{"name": "a", "type": "numeric", "nullable": True},
                                    {"name": "b", "type": "numeric", "nullable": True},
                                    {"name": "kind", "type": "categorical", "nullable": True},
                                    {"name": "year", "type": "categorical", "nullable": True}],
                         "outputs": {"task": "classification", "classes": ["cat", "dog", "eel"]}}


def test_sample_holds_the_first_test_rows_and_training_predictions(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")

    bundle = load_bundle(export_bundle(ExportConfig(features, model, sample_rows=5), tmp_path / "b").bundle_dir)

    raw, expected = bundle.sample()
    test_raw = pd.read_parquet(features / TEST_RAW_FILE)
    pd.testing.assert_frame_equal(raw, test_raw[bundle.input_columns].head(5))
    loaded = load_model(model)
    assert np.array_equal(expected, predict(loaded, bundle.transform.transform(raw)))
    assert expected.shape == (5,) and expected.dtype == np.float32


def test_served_predictions_equal_training_predictions(exported):
    features, _, path = exported
    bundle = load_bundle(path)
    raw, expected = bundle.sample()

    from_json = bundle.predict_records(json.loads(raw.to_json(orient="records")))
    from_records = bundle.predict_features(bundle.transform_records(records_from_frame(raw)))

    assert raw.isna().any().any()  # nulls went through the record path too
    np.testing.assert_allclose(from_json, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(from_records, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(bundle.predict_frame(raw), expected, rtol=0, atol=1e-6)
    assert from_json.dtype == np.float32


def test_whole_test_split_predicts_like_the_training_code(exported):
    features, model, path = exported
    bundle = load_bundle(path)
    test_raw = pd.read_parquet(features / TEST_RAW_FILE)

    served = bundle.predict_records(json.loads(test_raw.to_json(orient="records")))

    expected = predict(load_model(model), bundle.transform.transform(test_raw))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


def test_empty_and_wrong_width_feature_matrices(exported):
    bundle = load_bundle(exported[2])

    y = bundle.predict_features(np.zeros((0, bundle.transform.input_dim), np.float32))

    assert y.shape == ((0, 3) if bundle.task == "classification" else (0,))
    assert bundle.format_predictions(y) == []
    with pytest.raises(ValueError, match=r"shape \[n, 9\], found \[2, 4\]"):
        bundle.predict_features(np.zeros((2, 4), np.float32))


def test_classification_answers_name_the_most_probable_class(exports):
    bundle = load_bundle(exports["classification"][2])

    answers = bundle.format_predictions(np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32))

    assert bundle.classes == ("cat", "dog", "eel")
    assert [a["label"] for a in answers] == ["dog", "cat"]
    assert answers[0]["probabilities"] == pytest.approx({"cat": 0.1, "dog": 0.7, "eel": 0.2})
    assert json.loads(json.dumps(answers)) == answers
    with pytest.raises(ValueError, match=r"shape \[n, 3\]"):
        bundle.format_predictions(np.zeros(3, np.float32))


def test_regression_answers_hold_the_value(exports):
    bundle = load_bundle(exports["regression"][2])

    answers = bundle.format_predictions(np.array([3.25, -1.5], np.float32))

    assert bundle.classes is None and answers == [{"value": 3.25}, {"value": -1.5}]
    with pytest.raises(ValueError, match=r"shape \[n\]"):
        bundle.format_predictions(np.zeros((2, 1), np.float32))


def test_bad_records_are_refused_with_the_field_named(exported):
    bundle = load_bundle(exported[2])
    raw, _ = bundle.sample()
    records = records_from_frame(raw.head(2))
    records[1]["a"] = "abc"
    del records[0]["year"]

    with pytest.raises(RecordError) as info:
        bundle.predict_records(records)

    assert [e["field"] for e in info.value.errors] == ["records[0].year", "records[1].a"]
    assert info.value.errors[1]["message"] == "expected a number or null, found 'abc'"


def test_cnn_bundle_exports_and_predicts(tmp_path):
    spec = ModelSpec(type="cnn", image_shape=(4, 4), channels=[2], hidden_sizes=[8])
    features, model = make_run_dirs(tmp_path, "classification", spec, pixels=True)

    result = export_bundle(ExportConfig(features, model), tmp_path / "bundle")

    bundle = load_bundle(result.bundle_dir)
    raw, expected = bundle.sample()
    assert result.max_diff <= 1e-5
    np.testing.assert_allclose(bundle.predict_records(records_from_frame(raw)), expected, rtol=0, atol=1e-6)


def test_export_and_load_work_where_warnings_are_errors(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bundle = load_bundle(export_bundle(ExportConfig(features, model), tmp_path / "bundle").bundle_dir)
        raw, expected = bundle.sample()

        np.testing.assert_allclose(bundle.predict_frame(raw), expected, rtol=0, atol=1e-6)


def test_the_model_file_loads_without_the_project_code(exported):
    path = exported[2] / MODEL_FILE
    bundle = load_bundle(exported[2])
    x = bundle.transform.transform(bundle.sample()[0])
    script = ("import sys, warnings; warnings.simplefilter('ignore'); sys.modules['tasks'] = None; "
              "import numpy, torch; m = torch.jit.load(sys.argv[1]); "
              "print(m(torch.from_numpy(numpy.load(sys.argv[2]))).tolist())")
    np.save(exported[2].parent / "x.npy", x)

    out = subprocess.run([sys.executable, "-c", script, str(path), str(exported[2].parent / "x.npy")],
                         capture_output=True, text=True, check=True, timeout=120)

    np.testing.assert_allclose(np.array(json.loads(out.stdout)), bundle.sample()[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [MANIFEST_FILE, MODEL_FILE, FEATURE_SPEC_FILE, SIGNATURE_FILE, SAMPLE_FILE,
                                  SAMPLE_PREDICTIONS_FILE])
def test_a_bundle_missing_a_file_is_refused_naming_it(exported, tmp_path, name):
    copy = copy_bundle(exported[2], tmp_path)
    (copy / name).unlink()

    with pytest.raises(BundleError, match=f"lacks {name}"):
        load_bundle(copy)


def test_a_bundle_of_another_format_version_is_refused(exported, tmp_path):
    copy = copy_bundle(exported[2], tmp_path)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": BUNDLE_FORMAT_VERSION + 1}))

    with pytest.raises(BundleError, match=f"{MANIFEST_FILE} has format_version {BUNDLE_FORMAT_VERSION + 1}"):
        load_bundle(copy)


@pytest.mark.parametrize(("name", "content"), [
    (MODEL_FILE, b"not a torchscript archive"),
    (SAMPLE_PREDICTIONS_FILE, b""),
    (FEATURE_SPEC_FILE, b'{"format_version": 1}'),
], ids=["model", "predictions", "feature_spec"])
def test_an_altered_file_is_refused(exported, tmp_path, name, content):
    copy = copy_bundle(exported[2], tmp_path)
    (copy / name).write_bytes(content)

    with pytest.raises(BundleError, match=f"{name} does not match its sha256"):
        load_bundle(copy)


def test_an_unreadable_model_is_refused_naming_it(exported, tmp_path):
    copy = copy_bundle(exported[2], tmp_path)
    (copy / MODEL_FILE).write_bytes(b"not a torchscript archive")
    rehash(copy)

    with pytest.raises(BundleError, match=f"{MODEL_FILE} cannot be loaded as TorchScript"):
        load_bundle(copy)


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"format_version": 1}', "lacks the 'files' hashes"),
], ids=["not_json", "not_object", "no_hashes"])
def test_a_broken_manifest_is_refused(exported, tmp_path, content, match):
    copy = copy_bundle(exported[2], tmp_path)
    (copy / MANIFEST_FILE).write_text(content)

    with pytest.raises(BundleError, match=match):
        load_bundle(copy)


def test_a_folder_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_export_refuses_a_model_trained_on_other_features(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    spec = ModelSpec(hidden_sizes=[4])
    save_model(model / TRAINED_MODEL_FILE, build_model(spec, 5, 3), model_spec=spec, input_dim=5, n_outputs=3,
               task="classification")

    with pytest.raises(BundleError, match=r"\('classification', 5, 3\) does not fit the feature spec's "
                                          r"\('classification', 9, 3\)"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


def test_export_refuses_a_model_that_predicts_nan(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    loaded = load_model(model)
    with torch.no_grad():
        for p in loaded.module.parameters():
            p.fill_(float("nan"))
    save_model(model / TRAINED_MODEL_FILE, loaded.module, model_spec=ModelSpec(hidden_sizes=[8]),
               input_dim=loaded.meta["input_dim"], n_outputs=1, task="regression")

    with pytest.raises(BundleError, match="non-finite values"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


def test_export_refuses_an_empty_test_split(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    pd.read_parquet(features / TEST_RAW_FILE).iloc[:0].to_parquet(features / TEST_RAW_FILE, index=False)

    with pytest.raises(BundleError, match=f"{TEST_RAW_FILE} has 0 rows"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


def test_export_names_a_missing_input(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    (model / TRAINED_MODEL_FILE).unlink()

    with pytest.raises(FileNotFoundError, match=f"{TRAINED_MODEL_FILE} does not exist"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sample_rows": 0}, "sample_rows must be an integer >= 1"),
    ({"sample_rows": True}, "sample_rows must be an integer >= 1"),
    ({"metadata": {"run": 3}}, "metadata must map strings to strings"),
], ids=["zero_rows", "bool_rows", "non_string_metadata"])
def test_export_config_rejects_bad_fields(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(tmp_path, tmp_path, **kwargs)


def copy_bundle(path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def rehash(path: Path) -> None:
    """Refresh the manifest's hashes, as if the altered files had been exported so."""
    import hashlib

    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
