"""Raises while being imported."""

raise RuntimeError("config file settings.toml not found")
