"""Batch scoring: a dataset scored with the champion or a named version of a pipeline's model, partition by
partition, committed with a manifest (README "Batch scoring"; the steps in order: :mod:`kiln.tasks.scoring.run`)."""
