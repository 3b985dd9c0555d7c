"""Imports a package that is not installed (a requirement the pipeline forgot to declare)."""

import kiln_no_such_package  # noqa: F401


def build(input_dim, n_outputs):
    raise AssertionError("never reached")
