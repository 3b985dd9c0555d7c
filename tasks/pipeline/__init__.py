"""One run of a pipeline: its context, the ordered list of steps, artifact keys, the in-process runner."""
