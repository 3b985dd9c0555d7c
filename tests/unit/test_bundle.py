"""Unit tests for the model bundle: export, self-contained loading, train/serve parity and refused bundles (its
runtimes: test_bundle_runtimes.py)."""

from __future__ import annotations

import json
import warnings

import bundle_fixtures
import numpy as np
import pandas as pd
import pytest
import torch
from bundle_fixtures import PROVENANCE, copy_bundle, make_run_dirs
from synthetic import save_trained
from torch import nn

from kiln.tasks.bundle.export import ExportConfig, export_bundle
from kiln.tasks.bundle.load import (
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    ONNX_FILE,
    SAMPLE_FILE,
    SAMPLE_PREDICTIONS_FILE,
    SIGNATURE_FILE,
    BundleError,
    RecordError,
    load_bundle,
)
from kiln.tasks.bundle.program import PROGRAM_FILE, Servable, load_program, save_program
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.features.splits import TEST_RAW_FILE
from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.spec import ModelSpec
from kiln.tasks.training.networks import MODEL_FILE as TRAINED_MODEL_FILE
from kiln.tasks.training.networks import build_model, load_model, predict, save_model

# The shared fixtures (tests/bundle_fixtures.py); this module exports its own bundles once.
exports = bundle_fixtures.exports
exported = bundle_fixtures.exported


def test_export_writes_every_file_and_a_manifest_with_provenance(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")

    result = export_bundle(ExportConfig(features, model, metadata=PROVENANCE), tmp_path / "bundle")

    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == sorted(
        [MANIFEST_FILE, MODEL_FILE, ONNX_FILE, FEATURE_SPEC_FILE, SIGNATURE_FILE, SAMPLE_FILE, SAMPLE_PREDICTIONS_FILE])
    manifest = json.loads((tmp_path / "bundle" / MANIFEST_FILE).read_text())
    assert manifest == result.manifest
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION == 2 and manifest["metadata"] == PROVENANCE
    assert manifest["runtimes"] == ["onnx", "torch"] and manifest["onnx"]["file"] == ONNX_FILE
    assert sorted(manifest["files"]) == sorted(p.name for p in (tmp_path / "bundle").iterdir()
                                               if p.name != MANIFEST_FILE)
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


def test_the_train_steps_program_is_the_bundles_model(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    (model / TRAINED_MODEL_FILE).unlink()  # what register needs is model.pt2 alone

    result = export_bundle(ExportConfig(features, model), tmp_path / "bundle")

    assert (result.bundle_dir / MODEL_FILE).read_bytes() == (model / PROGRAM_FILE).read_bytes()
    bundle = load_bundle(result.bundle_dir)
    raw, expected = bundle.sample()
    np.testing.assert_allclose(expected, load_program(model).predict(bundle.transform.transform(raw)), rtol=0, atol=0)
    assert bundle.runtime == "onnx" and result.max_diff <= 1e-5


def test_an_older_train_output_without_a_program_is_exported_at_register(tmp_path):
    features, model = make_run_dirs(tmp_path, "classification")
    (model / PROGRAM_FILE).unlink()

    result = export_bundle(ExportConfig(features, model), tmp_path / "bundle")

    assert result.manifest["runtimes"] == ["onnx", "torch"] and result.max_diff <= 1e-5
    raw, expected = load_bundle(result.bundle_dir).sample()
    x = load_bundle(result.bundle_dir).transform.transform(raw)
    assert np.array_equal(expected, predict(load_model(model), x))  # the eager module's, as before model.pt2
    np.testing.assert_allclose(load_program(result.bundle_dir).predict(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [MANIFEST_FILE, MODEL_FILE, ONNX_FILE, FEATURE_SPEC_FILE, SIGNATURE_FILE,
                                  SAMPLE_FILE, SAMPLE_PREDICTIONS_FILE])
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
    (MODEL_FILE, b"not a program"),
    (ONNX_FILE, b"not an onnx model"),
    (SAMPLE_PREDICTIONS_FILE, b""),
    (FEATURE_SPEC_FILE, b'{"format_version": 1}'),
], ids=["program", "onnx", "predictions", "feature_spec"])
def test_an_altered_file_is_refused(exported, tmp_path, name, content):
    copy = copy_bundle(exported[2], tmp_path)
    (copy / name).write_bytes(content)

    with pytest.raises(BundleError, match=f"{name} does not match its sha256"):
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


@pytest.mark.parametrize("train_output", ["program", "older"])
def test_export_refuses_a_model_trained_on_other_features(tmp_path, train_output):
    features, model = make_run_dirs(tmp_path, "classification")
    spec = ModelSpec(hidden_sizes=[4])
    save_trained(model, build_model(spec, 5, 3), spec, 5, 3, "classification")
    if train_output == "older":
        (model / PROGRAM_FILE).unlink()

    with pytest.raises(BundleError, match=r"\('classification', 5, 3\) does not fit the feature spec's "
                                          r"\('classification', 9, 3\)"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


class _NaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * float("nan")


def test_export_refuses_a_model_that_predicts_nan(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    program = torch.export.export(Servable(_NaN(), False), (torch.zeros(2, 9),), strict=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    save_program(program, model / PROGRAM_FILE, {"task": "regression", "input_dim": 9, "n_outputs": 1})

    with pytest.raises(BundleError, match=f"{PROGRAM_FILE} predicts non-finite values"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


def test_export_refuses_an_older_model_that_predicts_nan(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    (model / PROGRAM_FILE).unlink()
    loaded = load_model(model)
    with torch.no_grad():
        for p in loaded.module.parameters():
            p.fill_(float("nan"))
    save_model(model / TRAINED_MODEL_FILE, loaded.module, model_spec=ModelSpec(hidden_sizes=[8]),
               input_dim=loaded.meta["input_dim"], n_outputs=1, task="regression")

    with pytest.raises(BundleError, match=f"{TRAINED_MODEL_FILE} predicts non-finite values"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


def test_export_refuses_an_empty_test_split(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    pd.read_parquet(features / TEST_RAW_FILE).iloc[:0].to_parquet(features / TEST_RAW_FILE, index=False)

    with pytest.raises(BundleError, match=f"{TEST_RAW_FILE} has 0 rows"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


def test_export_names_a_missing_model(tmp_path):
    features, model = make_run_dirs(tmp_path, "regression")
    (model / TRAINED_MODEL_FILE).unlink()
    (model / PROGRAM_FILE).unlink()

    with pytest.raises(FileNotFoundError, match=f"{PROGRAM_FILE} does not exist; run build_features and train"):
        export_bundle(ExportConfig(features, model), tmp_path / "bundle")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sample_rows": 0}, "sample_rows must be an integer >= 1"),
    ({"sample_rows": True}, "sample_rows must be an integer >= 1"),
    ({"metadata": {"run": 3}}, "metadata must map strings to strings"),
], ids=["zero_rows", "bool_rows", "non_string_metadata"])
def test_export_config_rejects_bad_fields(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(tmp_path, tmp_path, **kwargs)
