"""The platform as services (``kiln up|down|status``): supervision, environment, preload, MLflow server."""
