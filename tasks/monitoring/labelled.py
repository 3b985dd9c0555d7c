"""The labelled captured rows a retrain appends to its data (the spec's ``monitoring.retrain.append_labelled``).

With ``append_labelled`` on, a monitor run writes :data:`LABELLED_FILE` into its report folder: one row per
captured record of the judged (champion) version whose label came back, received in the window and at or after
the last retrain request (so a later retrain does not append the same rows twice). Its columns are the model's
inputs as captured (the baseline profile's columns; without a baseline, the captured columns that are neither the
capture's own nor the label) and the spec's target, holding the label text. Nothing else: the capture's provenance
columns (request id, version, times, predictions) are left out, so the rows fit the source's snapshot. At most
:data:`MAX_LABELLED_ROWS` rows, the newest; the report says how many were left out.

The retrain event names the report folder (``kiln_retrain.labelled``) and the triggered run's ``ingest`` appends
the file's rows to its snapshot (:mod:`kiln.tasks.sources.appended`), cast to the snapshot's column types.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from kiln.tasks.bundle.baseline import Baseline

log = logging.getLogger(__name__)

#: The file of labelled rows in a monitor report folder.
LABELLED_FILE = "labelled.parquet"
#: The most labelled rows one monitor run exports and one ingest appends (1,000,000: a window's labelled traffic
#: fits in memory at that size, and a retrain's data stays mostly the source's); the newest are kept.
MAX_LABELLED_ROWS = 1_000_000


@dataclass(frozen=True)
class LabelledExport:
    """What a monitor run exported for a retrain (the report's ``labelled`` entry)."""

    rows: int
    """Rows written to :data:`LABELLED_FILE` (0: no file)."""
    left_out: int
    """Older labelled rows beyond :data:`MAX_LABELLED_ROWS`, not exported."""
    since: str | None
    """ISO 8601 time of the last retrain request: only rows received at or after it (``None``: no request yet)."""
    file: str | None
    """:data:`LABELLED_FILE` when rows were written, else ``None``."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)


def input_columns(columns: Sequence[str], baseline: Baseline | None) -> list[str]:
    """The model's input columns among the captured ``columns``: the baseline profile's, in its order; without a
    baseline, the captured columns that are neither the capture's own nor the joined label."""
    from kiln.tasks.monitoring.window import CAPTURE_COLUMNS, LABEL

    inputs = list(baseline.profile.columns) if baseline is not None else \
        [c for c in columns if c not in (*CAPTURE_COLUMNS, LABEL)]
    return [c for c in inputs if c in columns]


def labelled_rows(captured: pd.DataFrame, feedback: pd.DataFrame, inputs: Sequence[str], target: str,
                  since: datetime | None, max_rows: int = MAX_LABELLED_ROWS) -> tuple[pd.DataFrame, int]:
    """The captured rows whose label came back, as training rows.

    Args:
        captured: the window's captured rows (:func:`kiln.tasks.monitoring.window.read_captures`).
        feedback: the window's feedback rows (:func:`kiln.tasks.monitoring.window.read_feedback`).
        inputs: the input columns kept (:func:`input_columns`).
        target: the name of the label's column (the spec's target).
        since: keep only rows received at or after this time (aware), or ``None``.
        max_rows: keep at most this many, the newest.

    Returns:
        The rows (``inputs`` as captured, then ``target`` holding the label text), oldest first, and how many
        older rows ``max_rows`` left out.

    Raises:
        ValueError: a naive ``since``.
    """
    import pandas as pd

    from kiln.tasks.monitoring.window import LABEL, join_labels

    columns = [c for c in inputs if c != target]
    if captured.empty:
        return pd.DataFrame({**{c: pd.Series(dtype=object) for c in columns}, target: pd.Series(dtype=object)}), 0
    joined = join_labels(captured, feedback)
    keep = joined[LABEL].notna()
    if since is not None:
        if since.tzinfo is None:
            raise ValueError(f"since {since.isoformat()} has no timezone: pass an aware datetime (UTC)")
        received = pd.to_datetime(joined["received_at"], utc=True)
        keep &= received >= pd.Timestamp(since.astimezone(UTC))
    rows = joined.loc[keep].sort_values("received_at", kind="stable")
    left_out = max(len(rows) - max_rows, 0)
    rows = rows.iloc[left_out:]
    out = rows[columns].reset_index(drop=True)
    out[target] = [str(v) for v in rows[LABEL]]
    return out, left_out


def export_labelled(folder: Path, captured: pd.DataFrame, feedback: pd.DataFrame, baseline: Baseline | None,
                    target: str, since: datetime | None) -> LabelledExport:
    """Write the labelled rows (:func:`labelled_rows`) to ``folder / LABELLED_FILE``, when there are any.

    Args:
        folder: the report folder being written (a store writer's folder: published with the report, or not at
            all).
        captured: the window's captured rows.
        feedback: the window's feedback rows.
        baseline: the served champion's baseline (its profile names the inputs), if any.
        target: the spec's target column.
        since: the last retrain request's time, or ``None``.

    Returns:
        What was exported.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, left_out = labelled_rows(captured, feedback, input_columns(list(captured.columns), baseline), target,
                                   since)
    if left_out:
        log.warning("%d older labelled rows left out of the retrain's data: at most %d are exported", left_out,
                    MAX_LABELLED_ROWS)
    said = f" received since the last retrain request ({since.isoformat()})" if since is not None else ""
    if rows.empty:
        log.info("no labelled captured rows%s: no %s", said, LABELLED_FILE)
        return LabelledExport(0, left_out, since.isoformat() if since else None, None)
    table = pa.Table.from_pandas(rows.drop(columns=[target]), preserve_index=False)
    # Text as the capture stores it (pandas' str columns come back as large_string).
    table = table.cast(pa.schema([pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f
                                  for f in table.schema.remove_metadata()]))
    table = table.append_column(target, pa.array(rows[target].tolist(), pa.string()))
    pq.write_table(table, folder / LABELLED_FILE)
    log.info("exported %d labelled captured rows%s to %s (%d columns)", table.num_rows, said, LABELLED_FILE,
             table.num_columns)
    return LabelledExport(table.num_rows, left_out, since.isoformat() if since else None, LABELLED_FILE)
