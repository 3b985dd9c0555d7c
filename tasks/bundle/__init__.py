"""The model bundle: the self-contained, servable form of a trained model."""
