"""The pipeline's own code: importing what the spec names, building a custom network, hashing the code folder;
each mistake is an error naming the spec field, the reference and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.tasks.spec import ModelSpec
from kiln.tasks.training.user_code import (
    FeatureLayout,
    UserCodeError,
    build_custom_model,
    code_hash,
    import_callable,
)

CODE = Path(__file__).resolve().parents[1] / "user_code"
LAYOUT = FeatureLayout(4, ("f0", "f1", "f2", "f3"), ())


@pytest.mark.parametrize(("ref", "expected"), [
    ("kiln_nowhere.net:build", ["module 'kiln_nowhere.net' was found neither in code.path", "dots, not slashes"]),
    ("missing_dependency:build", ["importing module 'missing_dependency' failed", "ModuleNotFoundError",
                                  "kiln_no_such_package", "code.requirements"]),
    ("import_crash:build", ["importing module 'import_crash' failed", "RuntimeError: config file settings.toml"]),
    ("tabular_net:biuld", ["has no attribute 'biuld'", "callables there:", "build"]),
    ("broken_code:NOT_CALLABLE", ["'NOT_CALLABLE' is a int, not a function or class"]),
    ("nothere.py:build", ["file 'nothere.py' does not exist in the code folder"]),
    ("../unit/test_user_code.py:x", ["lies outside the code folder"]),
], ids=["module-missing", "inner-import-error", "raises-on-import", "attribute-missing", "not-callable",
        "file-missing", "file-outside"])
def test_import_errors_name_the_field_the_reference_and_the_cause(ref, expected):
    with pytest.raises(UserCodeError) as info:
        import_callable(ref, str(CODE), field="model.factory")
    message = str(info.value)
    assert message.startswith(f"model.factory '{ref}': ")
    for part in expected:
        assert part in message


def test_module_and_file_references_import_the_same_code():
    by_module = import_callable("tabular_net:build", str(CODE), field="model.factory")
    by_file = import_callable("tabular_net.py:build", str(CODE), field="model.factory")
    assert by_module.__name__ == by_file.__name__ == "build"
    assert import_callable("user_loops.py:train_with_checkpoints", str(CODE), field="training.entrypoint")


def custom(factory: str, **options) -> ModelSpec:
    return ModelSpec(type="custom", factory=factory, options=options)


@pytest.mark.parametrize(("factory", "options", "expected"), [
    ("broken_code:returns_a_dict", {}, ["returned a dict, not a torch.nn.Module", "return the network"]),
    ("broken_code:wrong_width", {}, ["to shape [2, 5] torch.float32", "needs float [2, 2]", "n_outputs"]),
    ("broken_code:takes_no_options", {"width": 8}, ["calling it with ['input_dim', 'n_outputs', 'width'] failed",
                                                    "model.options as keyword arguments"]),
], ids=["not-a-module", "wrong-output-shape", "unexpected-option"])
def test_a_factory_that_does_not_build_a_fitting_network_is_named(factory, options, expected):
    with pytest.raises(UserCodeError) as info:
        build_custom_model(custom(factory, **options), str(CODE), LAYOUT, n_outputs=2)
    message = str(info.value)
    assert message.startswith(f"model.factory '{factory}': ")
    for part in expected:
        assert part in message


def test_factory_gets_options_and_the_feature_layout_with_categorical_slices():
    spec = {"input_dim": 7, "numeric": [{"name": "mass"}, {"name": "bill"}],
            "categorical": [{"name": "island", "vocabulary": ["Biscoe", "Dream"]},
                            {"name": "sex", "vocabulary": ["f"]}]}
    layout = FeatureLayout.from_feature_spec(spec)
    assert layout.numeric == ("mass", "bill")
    assert [(c.name, c.start, c.stop) for c in layout.categorical] == [("island", 2, 5), ("sex", 5, 7)]
    net = build_custom_model(custom("tabular_net:build", width=8, depth=1), str(CODE), layout, n_outputs=3)
    assert net.layout == layout and len(net.embed) == 2 and net.stem.out_features == 8
    assert net(torch.zeros(5, 7)).shape == (5, 3)
    with pytest.raises(ValueError, match="columns add up to 7 but input_dim is 9"):
        FeatureLayout.from_feature_spec({**spec, "input_dim": 9})


def test_code_hash_follows_the_files_and_skips_caches(tmp_path):
    (tmp_path / "net.py").write_text("X = 1\n")
    first = code_hash(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "net.cpython-312.pyc").write_bytes(b"\0")
    assert code_hash(tmp_path) == first
    (tmp_path / "net.py").write_text("X = 2\n")
    assert code_hash(tmp_path) != first
    with pytest.raises(UserCodeError, match="code.path .* is not a folder"):
        code_hash(tmp_path / "net.py")
