"""Train/serve parity: regression values are compared relative to their size, class probabilities absolutely."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.tasks.bundle.parity import compare_predictions, scaled_difference

TOLERANCE = 1e-5  # the spec's default deployment.infra_validation.tolerance


@pytest.mark.parametrize(("expected", "served", "passes"), [
    (4213.37, float(np.nextafter(np.float32(4213.37), np.float32(5000))), True),  # one float32 step: 4.9e-4 apart
    (4213.37, 4213.37 + 0.06, False),  # a real difference: 1.4e-5 of the value
    (50.0, 50.0 + 1.5e-5, True),  # the case that failed an absolute tolerance of 1e-5
    (0.3, 0.3 + 2e-5, False),  # small values: the difference itself counts
], ids=["float32-step-in-thousands", "real-drift-in-thousands", "rounding-near-50", "small-value-drift"])
def test_values_are_compared_relative_to_their_size(expected: float, served: float, passes: bool) -> None:
    diff, problem = compare_predictions([{"value": served}], [{"value": expected}])
    assert problem is None and (diff <= TOLERANCE) is passes, diff


def test_probabilities_are_compared_absolutely() -> None:
    served = [{"label": "a", "probabilities": {"a": 0.70002, "b": 0.29998}}]
    expected = [{"label": "a", "probabilities": {"a": 0.7, "b": 0.3}}]
    diff, problem = compare_predictions(served, expected)
    assert problem is None and diff == pytest.approx(2e-5, rel=1e-3)


def test_scaled_difference_is_elementwise_and_keeps_nan() -> None:
    got = scaled_difference(np.array([101.0, 0.5, np.nan]), np.array([100.0, 0.25, 1.0]))
    assert got[:2] == pytest.approx([0.01, 0.25]) and np.isnan(got[2])


def test_a_label_that_is_not_the_most_probable_class_is_a_problem() -> None:
    served = [{"label": "b", "probabilities": {"a": 0.7, "b": 0.3}}]
    _, problem = compare_predictions(served, [{"label": "a", "probabilities": {"a": 0.7, "b": 0.3}}])
    assert problem == "row 0: served label 'b' is not the most probable class"
