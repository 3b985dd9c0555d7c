"""Names of bundle files that are read without loading a model (:mod:`kiln.tasks.bundle.load` describes the whole
layout and re-exports these). Importing this costs nothing: the baseline's readers need the names but not torch,
which :mod:`kiln.tasks.bundle.load` loads."""

from __future__ import annotations

#: The manifest: format version, provenance, runtimes and the sha256 of every other file.
MANIFEST_FILE = "bundle.json"
#: The training baseline's summary (:mod:`kiln.tasks.bundle.baseline`).
BASELINE_FILE = "baseline.json"
#: The training baseline's sample of raw rows.
BASELINE_SAMPLE_FILE = "baseline_sample.parquet"
#: Both files of a baseline: a bundle exported with one holds both, bundles from before hold neither.
BASELINE_FILES = (BASELINE_FILE, BASELINE_SAMPLE_FILE)
