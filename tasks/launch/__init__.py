"""Launchers: where the ``train`` step's worker processes run (local torchrun, a Docker gang)."""
