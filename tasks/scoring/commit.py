"""Committing a scoring run: once every partition succeeded, its predictions, one rejects file and ``manifest.json``
are written into one folder that the store publishes atomically under ``<output>/<run id>``.

The manifest says what was scored with what: the model version and bundle, the input (its source, the staged
snapshot's sha256, rows and columns), each partition's rows and file, the row counts, and the sha256 of every file.
A run with a missing or altered partition, or with more rejected rows than ``scoring.max_rejected_share``, commits
nothing: no manifest is written, and earlier runs' outputs are untouched (each run has its own key).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln.tasks.scoring.config import ScoreConfig, ScoringError
from kiln.tasks.scoring.model import ScoringModel
from kiln.tasks.scoring.score import PART_FILE, PREDICTIONS_FILE, REJECTS_FILE
from kiln.tasks.storage.artifacts import file_sha256, read_json, write_json

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
PREDICTIONS_DIR = "predictions"


@dataclass(frozen=True)
class ScoreResult:
    """A committed scoring run."""

    version: str
    rows: int
    """Rows of the input."""
    scored: int
    rejected: int
    partitions: int
    manifest: str
    """The manifest's location (the published folder's ``manifest.json``)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the ``commit`` task's XCom)."""
        return asdict(self)


def run_commit(config: ScoreConfig, model: ScoringModel, staged: dict[str, Any], part_dirs: list[Path],
               partitions: int, out_dir: Path, run_id: str) -> dict[str, Any]:
    """Check every partition's files and write the run's output and manifest into ``out_dir``.

    Args:
        config: the run's settings.
        model: the version the run scored with.
        staged: ingest's manifest of the staged input.
        part_dirs: the published folders of the scored partitions.
        partitions: how many partitions the run planned.
        out_dir: an empty folder that the caller publishes once this returns.
        run_id: the run's id (recorded).

    Returns:
        The manifest.

    Raises:
        ScoringError: a partition is missing, was scored with another version or altered since, or too many rows
            were rejected; nothing is committed.
    """
    parts = sorted((read_json(d / PART_FILE) | {"dir": d} for d in part_dirs), key=lambda p: p["index"])
    missing = sorted(set(range(partitions)) - {p["index"] for p in parts})
    if missing or len(parts) != partitions:
        raise ScoringError(f"partitions {missing or 'beyond the plan'} of {partitions} have no scored output; every "
                           "partition must succeed before the run commits: clear the failed score tasks to retry them")
    for part in parts:
        if part["version"] != model.version:
            raise ScoringError(f"partition {part['index']} was scored with version {part['version']}, the run with "
                               f"{model.version}; score it again")
        for name, digest in part["files"].items():
            if file_sha256(part["dir"] / name) != digest:
                raise ScoringError(f"partition {part['index']}'s {name} no longer matches its sha256 (altered "
                                   "since it was scored); score that partition again")
    rows, rejected = staged["rows"], sum(p["rejected"] for p in parts)
    if rows and rejected / rows > config.max_rejected_share:
        raise ScoringError(f"{rejected} of {rows} rows ({rejected / rows:.1%}) were rejected, more than "
                           f"scoring.max_rejected_share ({config.max_rejected_share:g}); see the rejects of the "
                           "partitions under the run's _scoring folder, fix the input, or raise the share")
    files = _gather(parts, out_dir)
    manifest = {
        "pipeline": config.pipeline, "run_id": run_id,
        "model": {"version": model.version, "champion": model.champion, "bundle": model.bundle,
                  "source": model.source},
        "input": {"description": config.describe_input(), "source_uri": staged.get("source_uri"),
                  "source_kind": staged.get("source_kind"), "source_sha256": staged.get("source_sha256"),
                  "snapshot_sha256": staged.get("sha256"), "rows": rows, "columns": staged.get("columns")},
        "id_column": config.id_column, "rows": rows, "scored": sum(p["scored"] for p in parts), "rejected": rejected,
        "partitions": [{k: p[k] for k in ("index", "start", "stop", "scored", "rejected")}
                       | {"file": f"{PREDICTIONS_DIR}/part-{p['index']:05d}.parquet"} for p in parts],
        "files": files, "created_at": datetime.now(UTC).isoformat(),
    }
    write_json(out_dir / MANIFEST_FILE, manifest)
    log.info("committed %d rows of %s: %d scored, %d rejected, %d partitions, version %s", rows,
             config.describe_input(), manifest["scored"], rejected, partitions, model.version)
    return manifest


def _gather(parts: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """Copy the partitions' predictions into ``out_dir/predictions/`` and their rejects into one file; the sha256
    of each written file, by its path in ``out_dir``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out_dir / PREDICTIONS_DIR).mkdir()
    files: dict[str, str] = {}
    for part in parts:
        name = f"{PREDICTIONS_DIR}/part-{part['index']:05d}.parquet"
        shutil.copyfile(part["dir"] / PREDICTIONS_FILE, out_dir / name)
        files[name] = part["files"][PREDICTIONS_FILE]
    rejects = pa.concat_tables([pq.read_table(p["dir"] / REJECTS_FILE) for p in parts])
    pq.write_table(rejects, out_dir / REJECTS_FILE, compression="snappy")
    files[REJECTS_FILE] = file_sha256(out_dir / REJECTS_FILE)
    return files
