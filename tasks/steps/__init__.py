"""The pipeline's steps, one module per step, each named exactly as its Airflow task id."""
