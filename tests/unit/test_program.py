"""The exported program (``model.pt2``): what torch.export cannot capture faithfully fails with the operation, the
user's line and the fix, before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kiln.tasks.bundle.program import ModelExportError, export_program, load_program, save_program


@torch.library.custom_op("kiln_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.linear = kind, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.kind == "branch":
            return out if x.sum() > 0 else -out  # a Python branch on a tensor's value
        if self.kind == "fixed_batch":
            return out.view(8, 3)  # the batch size of the example, frozen
        if self.kind == "custom_op":
            return _twice(out)
        return out


@pytest.mark.parametrize(("kind", "names"), [
    ("branch", ["test_program.py", "x.sum() > 0", "torch.where"]),
    ("fixed_batch", ["specialized", "use -1 or x.shape[0]"]),
    ("custom_op", ["kiln_test::twice", "test_program.py", "torch operations"]),
], ids=["data-dependent-branch", "batch-size-fixed", "custom-operator"])
def test_an_unexportable_forward_names_the_cause_and_the_fix(kind: str, names: list[str]) -> None:
    with pytest.raises(ModelExportError) as info:
        export_program(_Net(kind), torch.randn(8, 4), "classification", source="model.factory 'net:build'")
    message = str(info.value)
    assert message.startswith("model.factory 'net:build'")
    for name in names:
        assert name in message


def test_a_diverged_network_is_named_as_diverged_not_as_unexportable() -> None:
    net = _Net("plain")
    with torch.no_grad():
        net.linear.weight.fill_(float("nan"))
    with pytest.raises(ModelExportError, match="training diverged; lower training.learning_rate"):
        export_program(net, torch.randn(4, 4), "classification")


def test_a_program_predicts_any_batch_size_like_the_module_after_a_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    net = _Net("plain")
    program = export_program(net, torch.randn(1, 4), "classification")  # one row: traced on two
    save_program(program, tmp_path / "model.pt2", {"task": "classification", "n_outputs": 3})
    loaded = load_program(tmp_path)
    x = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(loaded.predict(x), want, atol=1e-6)
    assert loaded.predict(x[:0]).shape == (0, 3)
    assert loaded.meta["n_outputs"] == 3
