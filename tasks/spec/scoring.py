"""The ``scoring:`` section of a pipeline spec: how the ``<pipeline>_score`` DAG scores a dataset in batch (README
"Batch scoring"). Every field has a default, so a spec without the section gets a scoring DAG too; the DAG's
``partition_rows`` Param is generated from the field here (:func:`kiln.tasks.spec.params.scoring_param_schemas`)."""

from __future__ import annotations

from pydantic import Field, field_validator

from kiln.tasks.spec.base import _Strict

#: The most partitions (mapped ``score`` tasks) one scoring run may have; Airflow's ``max_map_length`` is 1024.
MAX_PARTITIONS = 1000
#: The largest batch the exported program takes (:data:`kiln.tasks.bundle.program.MAX_BATCH`, 2**20).
MAX_SCORE_BATCH = 1 << 20


class ScoringSpec(_Strict):
    """Batch scoring of a dataset with the champion or a named version of the pipeline's model."""

    id_column: str | None = Field(default=None, min_length=1, max_length=200)
    """A column of the scored input that identifies its rows (an order id, a customer id): the predictions and the
    rejects carry it. None: they carry ``row``, each row's ordinal in the input (0-based)."""
    partition_rows: int = Field(default=250_000, ge=1_000, le=10_000_000, title="Rows per partition")
    """Rows of one partition: each partition is scored by its own mapped ``score`` task, on its own lease."""
    parallel: int = Field(default=2, ge=1, le=64)
    """The most partitions scored at once in one run (the mapped task's ``max_active_tis_per_dagrun``)."""
    batch_size: int = Field(default=65_536, ge=1, le=MAX_SCORE_BATCH)
    """Rows per call of the model while a partition is scored."""
    cpus: int = Field(default=1, ge=1, le=1024)
    """CPU cores each ``score`` task leases from ``training.resources.pool`` (its model runs that many threads)."""
    memory: str | int = "2GiB"
    """Memory each ``score`` task leases, e.g. ``4GiB``."""
    max_rejected_share: float = Field(default=0.1, ge=0, le=1)
    """The run fails at ``commit`` (no manifest, the earlier outputs untouched) when more than this share of the
    input's rows is rejected (a value the model cannot take): a mostly broken input is an error, not a result."""

    @field_validator("memory")
    @classmethod
    def _size(cls, v: str | int) -> str | int:
        from kiln.tasks.pools.allocation import parse_size

        parse_size(v, field_name="size")
        return v
