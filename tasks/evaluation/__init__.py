"""Scoring models: metrics, bootstrap resampling and the gate's rules."""
