"""Plain-Python pipeline steps. Nothing in this package imports Airflow."""
