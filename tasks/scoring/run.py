"""The steps of a batch-scoring run, in order, as the ``<pipeline>_score`` DAG and :func:`run_score` (in process:
tests, notebooks, the benchmark) run them:

1. :func:`prepare`: resolve the version (the champion or a named one), read the input with ingest's readers into
   a staged snapshot, and check its schema against the model's signature; published under ``<work>/input``.
2. :func:`validate`: check the staged input with the pipeline's expectation suite; the report under
   ``<work>/validate``.
3. :func:`partition`: the partitions (row ranges) to score.
4. :func:`score`: one partition (the DAG maps one leased task per partition); under ``<work>/parts/<index>``.
5. :func:`commit`: once every partition succeeded, the output and its manifest under ``<output>/<run id>``.

Every refusal (an unknown version, an input that does not match the signature or fails the suite, partition rows
out of bounds, a missing input) is raised by steps 1-3, before anything is written under the output prefix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.scoring.commit import MANIFEST_FILE, ScoreResult, run_commit
from kiln.tasks.scoring.config import (
    INPUT,
    MODEL_FILE,
    PARTS,
    VALIDATION_FILE,
    ScoreConfig,
    output_key,
    part_key,
    work_key,
)
from kiln.tasks.scoring.model import ScoringModel, local_bundle, resolve_model
from kiln.tasks.scoring.partition import Partition, plan_partitions
from kiln.tasks.spec import PipelineSpec
from kiln.tasks.storage.artifacts import ArtifactStore, read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.bundle.load import Bundle
    from kiln.tasks.pools.allocation import LeaseRequest

log = logging.getLogger(__name__)

#: The folder of the validation report in a run's work.
VALIDATE = "validate"


def prepare(config: ScoreConfig, store: ArtifactStore, run_id: str, model: ScoringModel | None = None
            ) -> dict[str, Any]:
    """Resolve the model and stage the input, once per run (a retry reuses both: the run keeps its version even if
    the champion moved since).

    Args:
        config: the run's settings.
        store: the artifact store.
        run_id: the run's id (its Airflow run id).
        model: the model to score with; None: resolve ``config.version`` in the registry.

    Returns:
        The staged input's manifest (rows, columns, sha256) with ``model``.

    Raises:
        ScoringError: an unknown version or no champion, a missing or unreadable input, or an input whose schema
            does not match the model's signature (naming the columns).
    """
    import pyarrow.parquet as pq

    from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform
    from kiln.tasks.scoring.inputs import check_schema, stage_input

    key = f"{work_key(config.pipeline, run_id)}/{INPUT}"
    if store.exists(key):
        staged = store.path(key)
        log.info("the input of run %s is already staged; reusing it", run_id)
        return {**read_json(staged / keys.SNAPSHOT_MANIFEST_FILE), "model": read_json(staged / MODEL_FILE)}
    model = model or resolve_model(config.pipeline, config.version)
    transform = FeatureTransform.load(Path(model.bundle) / FEATURE_SPEC_FILE)
    with store.writer(key) as out:
        stage_input(config, out)
        check_schema(pq.ParquetFile(out / keys.SNAPSHOT_FILE).schema_arrow, transform, config.id_column)
        write_json(out / MODEL_FILE, model.to_dict())
        return {**read_json(out / keys.SNAPSHOT_MANIFEST_FILE), "model": model.to_dict()}


def validate(spec: PipelineSpec, config: ScoreConfig, store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """Check the staged input with the pipeline's suite; the report is published even when it fails.

    Raises:
        DataValidationError: an expectation failed.
    """
    from kiln.tasks.bundle.load import SIGNATURE_FILE
    from kiln.tasks.scoring.inputs import validate_input
    from kiln.tasks.steps.validate import DataValidationError

    staged = store.path(f"{work_key(config.pipeline, run_id)}/{INPUT}")
    model = ScoringModel.from_dict(read_json(staged / MODEL_FILE))
    signature = read_json(local_bundle(model, config.pipeline) / SIGNATURE_FILE)
    inputs = [i["name"] for i in signature["inputs"]]
    failure: DataValidationError | None = None

    def write(out: Path) -> dict[str, Any]:
        nonlocal failure
        try:
            return validate_input(spec, staged / keys.SNAPSHOT_FILE, inputs, out)
        except DataValidationError as exc:  # published first, raised after: the report is the evidence
            failure = exc
            return {"success": False}

    key = f"{work_key(config.pipeline, run_id)}/{VALIDATE}"
    with store.writer(key) as out:
        summary = write(out)
    if failure is not None:
        raise failure
    return {**summary, "report_file": f"{store.uri(key)}/{VALIDATION_FILE}"}


def lease_request(spec: PipelineSpec) -> LeaseRequest:
    """What one ``score`` task leases: ``scoring.cpus`` cores and ``scoring.memory`` on one node of the pool, team
    and priority of ``training.resources`` (not preemptible: a partition is short, and a retry scores it again)."""
    from kiln.tasks.pools.allocation import LeaseRequest, parse_size

    r = spec.training.resources
    return LeaseRequest(pool=r.pool, cpus=spec.scoring.cpus,
                        memory=parse_size(spec.scoring.memory, field_name="scoring.memory"), team=r.team,
                        priority=r.priority, ttl_s=float(r.ttl_s))


def partition(config: ScoreConfig, store: ArtifactStore, run_id: str) -> list[dict[str, int]]:
    """The partitions of the staged input (what the DAG maps ``score`` over).

    Raises:
        ScoringError: an empty input, or more partitions than one run may have.
    """
    staged = read_json(store.path(f"{work_key(config.pipeline, run_id)}/{INPUT}") / keys.SNAPSHOT_MANIFEST_FILE)
    parts = plan_partitions(int(staged["rows"]), config.partition_rows)
    log.info("%d rows in %d partition(s) of up to %d rows", staged["rows"], len(parts), config.partition_rows)
    return [p.to_dict() for p in parts]


def score(config: ScoreConfig, store: ArtifactStore, run_id: str, part: dict[str, Any], *,
          threads: int | None = None, bundle: Bundle | None = None) -> dict[str, Any]:
    """Score one partition and publish its files under ``<work>/parts/<index>``.

    Args:
        config: the run's settings.
        store: the artifact store.
        run_id: the run's id.
        part: the partition (:meth:`Partition.to_dict`).
        threads: the model's intra-op threads (the leased cores); None: torch's default.
        bundle: the bundle already loaded (the in-process runner loads it once); None: loaded here.

    Returns:
        :class:`~kiln.tasks.scoring.score.PartitionResult` as a dict.
    """
    from kiln.tasks.scoring.score import run_score_partition

    staged = store.path(f"{work_key(config.pipeline, run_id)}/{INPUT}")
    model = ScoringModel.from_dict(read_json(staged / MODEL_FILE))
    if bundle is None:
        from kiln.tasks.bundle.load import load_bundle

        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        bundle = load_bundle(local_bundle(model, config.pipeline), config.runtime, threads=threads)
    chunk = Partition.from_dict(part)
    with store.writer(part_key(config.pipeline, run_id, chunk.index)) as out:
        result = run_score_partition(bundle, model.version, staged / keys.SNAPSHOT_FILE, chunk, out,
                                     id_column=config.id_column, batch_size=config.batch_size)
    return result.to_dict()


def commit(config: ScoreConfig, store: ArtifactStore, run_id: str) -> ScoreResult:
    """Publish the run's output and manifest under ``<output>/<run id>`` once every partition has its files.

    Raises:
        ScoringError: a partition is missing or altered, or too many rows were rejected (nothing is published).
    """
    work = work_key(config.pipeline, run_id)
    staged = store.path(f"{work}/{INPUT}")
    manifest = read_json(staged / keys.SNAPSHOT_MANIFEST_FILE)
    model = ScoringModel.from_dict(read_json(staged / MODEL_FILE))
    planned = len(plan_partitions(int(manifest["rows"]), config.partition_rows))
    part_dirs = [store.path(f"{work}/{PARTS}/{name}") for name in store.children(f"{work}/{PARTS}")]
    key = output_key(config, run_id)
    with store.writer(key) as out:
        written = run_commit(config, model, manifest, part_dirs, planned, out, run_id)
    return ScoreResult(version=model.version, rows=written["rows"], scored=written["scored"],
                       rejected=written["rejected"], partitions=planned, manifest=f"{store.uri(key)}/{MANIFEST_FILE}")


def run_score(spec: PipelineSpec, config: ScoreConfig, store: ArtifactStore, run_id: str, *,
              model: ScoringModel | None = None, validate_input: bool = True) -> ScoreResult:
    """Every step of a scoring run in this process, partitions one after another, the bundle loaded once.

    Args:
        spec: the pipeline (its suite).
        config: the run's settings.
        store: the artifact store.
        run_id: the run's id.
        model: the model to score with; None: ``config.version`` from the registry.
        validate_input: check the input with the pipeline's suite (off: only the schema and the row checks).

    Raises:
        ScoringError, DataValidationError: see the steps.
    """
    from kiln.tasks.bundle.load import load_bundle

    staged = prepare(config, store, run_id, model)
    if validate_input:
        validate(spec, config, store, run_id)
    resolved = ScoringModel.from_dict(staged["model"])
    bundle = load_bundle(local_bundle(resolved, config.pipeline), config.runtime)
    for part in partition(config, store, run_id):
        score(config, store, run_id, part, bundle=bundle)
    return commit(config, store, run_id)
