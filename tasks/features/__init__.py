"""Tabular data to model input: column types, the fitted feature transform, raw records."""
