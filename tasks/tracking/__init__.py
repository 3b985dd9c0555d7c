"""MLflow: the runs of a pipeline and the model registry."""
