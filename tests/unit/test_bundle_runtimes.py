"""Unit tests for the bundle's runtimes: format 2's ONNX and torch runtimes and the choice between them,
model.onnx absent, unreadable or unlisted, programs without a faithful ONNX conversion serving with torch, and
format 1 TorchScript bundles that still load."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import bundle_fixtures
import numpy as np
import pandas as pd
import pytest
import torch
from bundle_fixtures import copy_bundle, make_run_dirs, rehash
from serving_fixtures import make_bundle_without_onnx, make_torchscript_bundle
from torch import nn

from kiln.tasks.bundle.export import ExportConfig, export_bundle
from kiln.tasks.bundle.load import (
    MANIFEST_FILE,
    MODEL_FILE,
    ONNX_FILE,
    SAMPLE_FILE,
    SAMPLE_PREDICTIONS_FILE,
    SIGNATURE_FILE,
    BundleError,
    load_bundle,
)
from kiln.tasks.bundle.program import PROGRAM_FILE, export_program, save_program
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.features.splits import TEST_RAW_FILE
from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.training.networks import load_model, predict

# The shared fixtures (tests/bundle_fixtures.py); this module exports its own bundles once.
exports = bundle_fixtures.exports
exported = bundle_fixtures.exported


def test_the_model_files_load_without_the_project_code(exported):
    bundle = load_bundle(exported[2])
    x = bundle.transform.transform(bundle.sample()[0])
    script = ("import sys, json, warnings; warnings.simplefilter('ignore'); sys.modules['kiln'] = None; "
              "import numpy, onnxruntime, torch; x = numpy.load(sys.argv[3]); "
              "program = torch.export.load(sys.argv[1]).module(); "
              "session = onnxruntime.InferenceSession(sys.argv[2]); "
              "print(json.dumps([program(torch.from_numpy(x)).tolist(), session.run(None, {'x': x})[0].tolist()]))")
    np.save(exported[2].parent / "x.npy", x)

    out = subprocess.run([sys.executable, "-c", script, str(exported[2] / MODEL_FILE), str(exported[2] / ONNX_FILE),
                          str(exported[2].parent / "x.npy")], capture_output=True, text=True, check=True, timeout=120)

    from_program, from_onnx = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(from_program), bundle.sample()[1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(from_onnx), bundle.sample()[1], rtol=0, atol=1e-6)

@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_each_runtime_predicts_the_whole_test_split_like_the_training_code(exported, runtime):
    features, model, path = exported
    bundle = load_bundle(path, runtime)
    test_raw = pd.read_parquet(features / TEST_RAW_FILE)

    served = bundle.predict_records(json.loads(test_raw.to_json(orient="records")))

    assert bundle.runtime == runtime and bundle.runtimes == ("onnx", "torch")
    np.testing.assert_allclose(served, predict(load_model(model), bundle.transform.transform(test_raw)),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(bundle.predict_records(records_from_frame(test_raw.head(1))), served[:1],
                               rtol=0, atol=1e-6)


def test_auto_serves_with_onnx_runtime_when_the_bundle_has_it(exports):
    assert load_bundle(exports["classification"][2]).runtime == "onnx"
    assert load_bundle(exports["classification"][2], "auto").runtime == "onnx"


def test_a_bundle_without_onnx_serves_with_torch_and_refuses_runtime_onnx(exports, tmp_path):
    copy = make_bundle_without_onnx(exports["classification"][2], tmp_path / "copy",
                                    reason="the ONNX conversion failed: test")

    assert load_bundle(copy).runtime == "torch" and load_bundle(copy).runtimes == ("torch",)
    with pytest.raises(BundleError, match=r"has no model\.onnx \(the ONNX conversion failed: test\), so it cannot "
                                          r"be served with runtime 'onnx'; choose 'auto' or 'torch' \(the model "
                                          r"server's --runtime flag or KILN_SERVE_RUNTIME\)"):
        load_bundle(copy, "onnx")


def test_an_unknown_runtime_is_refused_naming_the_choices(exports):
    with pytest.raises(ValueError, match="runtime must be one of auto, onnx, torch, found 'tensorrt'"):
        load_bundle(exports["classification"][2], "tensorrt")  # type: ignore[arg-type]


def test_a_format_1_torchscript_bundle_still_loads_and_predicts(exported, tmp_path):
    features, model, path = exported
    old = make_torchscript_bundle(path, tmp_path / "v1", model_dir=model)
    raw, expected = load_bundle(path).sample()

    bundle = load_bundle(old)

    assert sorted(json.loads((old / MANIFEST_FILE).read_text())["files"]) == sorted(
        ["model.ts", FEATURE_SPEC_FILE, SIGNATURE_FILE, SAMPLE_FILE, SAMPLE_PREDICTIONS_FILE])
    assert bundle.runtime == "torchscript" and bundle.runtimes == ("torchscript",)
    assert load_bundle(old, "torch").runtime == "torchscript"
    np.testing.assert_allclose(bundle.predict_records(records_from_frame(raw)), expected, rtol=0, atol=1e-6)
    with pytest.raises(BundleError, match="is of format 1 .* cannot be served with runtime 'onnx'"):
        load_bundle(old, "onnx")

class _Bessel(nn.Module):
    """An MLP with an operation that torch.export keeps and the ONNX converter has no translation for."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.linear = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.special.i0(x))


class _Asserting(nn.Module):
    """An MLP that checks its input at run time (the ONNX converter would drop the check)."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.linear = nn.Linear(d, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert_async((x.abs() < 1e6).all(), "feature out of range")
        return self.linear(x)


@pytest.mark.parametrize(("network", "reason"), [
    (_Bessel, "the ONNX conversion failed: DispatchError: No ONNX function found for .*bessel_i0"),
    (_Asserting, r"the program checks values at run time \(aten._assert_async.msg\), which ONNX drops"),
], ids=["no_onnx_operator", "value_assertion"])
def test_a_program_without_a_faithful_onnx_conversion_serves_with_torch(tmp_path, caplog, network, reason):
    features, model = make_run_dirs(tmp_path, "classification")
    meta = {"task": "classification", "input_dim": 9, "n_outputs": 3}
    save_program(export_program(network(9, 3).eval(), torch.rand(4, 9), "classification"), model / PROGRAM_FILE, meta)

    result = export_bundle(ExportConfig(features, model), tmp_path / "bundle")

    assert not (result.bundle_dir / ONNX_FILE).exists()
    assert result.manifest["runtimes"] == ["torch"] and result.manifest["onnx"]["file"] is None
    assert re.search(reason, result.manifest["onnx"]["reason"]), result.manifest["onnx"]["reason"]
    assert any("serves with the torch runtime" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    bundle = load_bundle(result.bundle_dir)
    raw, expected = bundle.sample()
    assert bundle.runtime == "torch"
    np.testing.assert_allclose(bundle.predict_frame(raw), expected, rtol=0, atol=1e-6)

@pytest.mark.parametrize(("name", "runtime", "match"), [
    (MODEL_FILE, "torch", f"{MODEL_FILE} cannot be loaded"),
    (ONNX_FILE, "onnx", f"{ONNX_FILE} cannot be loaded by ONNX Runtime"),
], ids=["program", "onnx"])
def test_an_unreadable_model_is_refused_naming_it(exported, tmp_path, name, runtime, match):
    copy = copy_bundle(exported[2], tmp_path)
    (copy / name).write_bytes(b"not a model")
    rehash(copy)

    with pytest.raises(BundleError, match=match):
        load_bundle(copy, runtime)


def test_an_onnx_file_the_manifest_does_not_list_is_refused(exports, tmp_path):
    copy = make_bundle_without_onnx(exports["classification"][2], tmp_path / "copy")
    (copy / ONNX_FILE).write_bytes((exports["classification"][2] / ONNX_FILE).read_bytes())

    with pytest.raises(BundleError, match=f"holds {ONNX_FILE}, which {MANIFEST_FILE} does not list"):
        load_bundle(copy)
