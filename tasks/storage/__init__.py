"""Artifact stores: the local folder (embedded default) and S3, behind one interface."""
