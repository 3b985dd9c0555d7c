"""Thin Airflow adapters (operators, hooks, CLI) over the plain-Python steps in ``tasks``."""
