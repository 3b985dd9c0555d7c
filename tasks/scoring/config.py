"""What a batch-scoring run is asked to do (:class:`ScoreConfig`), where it keeps its work and its output, and its
error.

A run keeps its work under ``<pipeline>/_scoring/<run id>/`` in the artifact store (``input``: the staged input and
the resolved model; ``parts/<index>``: one folder per scored partition) and commits its output, once every
partition succeeded, under ``<output>/<run id>/`` (:mod:`kiln.tasks.scoring.commit`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.tasks.errors import DataError
from kiln.tasks.settings import SERVE_RUNTIMES, ServeRuntime
from kiln.tasks.spec import PipelineSpec, SourceSpec
from kiln.tasks.storage.artifacts import key_parts, run_key

#: ``version`` of a run that scores with the version the ``champion`` alias names when the run starts.
CHAMPION = "champion"
_VERSION = re.compile(r"^(champion|[1-9][0-9]{0,17})$")
#: The work folders of a run, under :func:`work_key`.
INPUT = "input"
PARTS = "parts"
#: Files of the staged input folder beside ingest's snapshot and manifest.
MODEL_FILE = "model.json"
VALIDATION_FILE = "validation.json"


class ScoringError(DataError):
    """A scoring run that cannot go on as asked: the message names the Param or field and the fix. Raised before
    any output is written (or, at ``commit``, instead of writing the manifest)."""


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run's settings: the spec's ``scoring`` section with the run's Params applied."""

    pipeline: str
    """The pipeline whose model scores (the registered model's name)."""
    source: SourceSpec
    """The input (Param ``input``), read with ingest's readers."""
    version: str = CHAMPION
    """``champion`` or a registered version number (Param ``version``)."""
    partition_rows: int = 250_000
    """Rows per partition (Param ``partition_rows``; bounds: ``scoring.partition_rows``)."""
    output: str = ""
    """The artifact-store prefix the run commits under (Param ``output``; default ``<pipeline>/scores``)."""
    id_column: str | None = None
    """The input's id column (``scoring.id_column``); None: rows are named by their ordinal, ``row``."""
    batch_size: int = 65_536
    """Rows per model call (``scoring.batch_size``)."""
    max_rejected_share: float = 0.1
    """Largest share of rejected rows a committed run may have (``scoring.max_rejected_share``)."""
    runtime: ServeRuntime = "auto"
    """What runs the model (as the model server's ``--runtime``): ``auto`` takes ONNX Runtime where the bundle has
    ``model.onnx``."""
    spec_dir: Path | None = None
    """The spec file's folder: a relative input path is resolved against it, and it is a data root."""

    def __post_init__(self) -> None:
        from pydantic import ValidationError

        from kiln.tasks.spec.scoring import ScoringSpec

        if not _VERSION.fullmatch(str(self.version)):
            raise ScoringError(f"Param 'version': {self.version!r} is not a version; give 'champion' or a registered "
                               "version number such as '3'")
        if self.runtime not in SERVE_RUNTIMES:
            raise ScoringError(f"ScoreConfig.runtime: {self.runtime!r} is not one of {', '.join(SERVE_RUNTIMES)}")
        try:  # the bounds are the spec fields' (one declaration)
            ScoringSpec(partition_rows=self.partition_rows, batch_size=self.batch_size, id_column=self.id_column,
                        max_rejected_share=self.max_rejected_share)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (found {e.get('input')!r})"
                                 for e in exc.errors())
            raise ScoringError(f"Param or field scoring.{problems}; give a value within the bounds") from None
        output = self.output or f"{self.pipeline}/scores"
        try:
            parts = key_parts(output)
        except ValueError as exc:
            raise ScoringError(f"Param 'output': {exc}") from None
        if len(parts) < 2 or parts[0] != self.pipeline or parts[1].startswith(("_", ".")):
            raise ScoringError(f"Param 'output': {output!r} must be a prefix under '{self.pipeline}/' whose first "
                               f"folder does not start with '_' or '.' (kiln's own folders), e.g. "
                               f"'{self.pipeline}/scores'")
        object.__setattr__(self, "output", "/".join(parts))

    @classmethod
    def from_spec(cls, spec: PipelineSpec, params: Mapping[str, Any] | None = None,
                  spec_dir: str | Path | None = None) -> ScoreConfig:
        """The config of a run of ``spec``'s scoring DAG with its Params (``input``, ``version``,
        ``partition_rows``, ``output``; missing or None ones take the spec's values).

        Raises:
            ScoringError: a Param that is invalid, naming it, what was found and the fix.
        """
        params = {k: v for k, v in (params or {}).items() if v is not None}
        folder = Path(spec_dir) if spec_dir is not None else None
        source = spec.source
        if "input" in params:
            source = _source(params["input"], folder)
        scoring = spec.scoring
        return cls(pipeline=spec.name, source=source, version=str(params.get("version", CHAMPION)),
                   partition_rows=_integer(params.get("partition_rows", scoring.partition_rows), "partition_rows"),
                   output=str(params.get("output", "")), id_column=scoring.id_column,
                   batch_size=scoring.batch_size, max_rejected_share=scoring.max_rejected_share, spec_dir=folder)

    @classmethod
    def load(cls, spec_path: str | Path, params: Mapping[str, Any] | None = None) -> tuple[PipelineSpec, ScoreConfig]:
        """The spec file's pipeline and the config of a scoring run of it with ``params`` (the DAG's Params).

        Raises:
            SpecError: the spec file is invalid.
            ScoringError: a Param is invalid.
        """
        from kiln.tasks.spec import load_spec

        spec = load_spec(spec_path)
        return spec, cls.from_spec(spec, params, Path(spec_path).parent)

    def describe_input(self) -> str:
        """The input as people name it: its URI, or ``sql://<conn_id>`` and the query's start."""
        if self.source.sql is not None:
            return f"sql://{self.source.sql.conn_id}: {' '.join(self.source.sql.query.split())[:200]}"
        return str(self.source.uri)


def _integer(value: Any, name: str) -> int:
    if type(value) is not int:
        raise ScoringError(f"Param '{name}': expected a whole number, found {value!r}")
    return value


def _source(value: Any, spec_dir: Path | None) -> SourceSpec:
    """The ``input`` Param as a source section, its URI checked as a spec's ``source.uri`` is."""
    from pydantic import ValidationError

    from kiln.tasks.spec.loading import check_source_uri
    from kiln.tasks.spec.sources import SourceError

    if isinstance(value, str):
        value = {"uri": value}
    if not isinstance(value, dict):
        raise ScoringError(f"Param 'input': expected a source section ({{\"uri\": ...}} or {{\"sql\": {{...}}}}), "
                           f"found {type(value).__name__}")
    if set(value) & {"watch", "incremental"}:
        raise ScoringError("Param 'input': 'watch' and 'incremental' apply to a pipeline's source, not to a scored "
                           "input; remove them")
    try:
        source = SourceSpec.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"input.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ScoringError(f"Param 'input': {problems}") from None
    if source.uri is not None:
        try:
            uri = check_source_uri(source.uri, spec_dir)
        except SourceError as exc:
            raise ScoringError(f"Param 'input': {exc}") from None
        source = source.model_copy(update={"uri": uri})
    return source


def work_key(pipeline: str, run_id: str) -> str:
    """The store prefix of one scoring run's work: ``<pipeline>/_scoring/<run id>``."""
    return run_key(f"{pipeline}/_scoring", run_id)


def part_key(pipeline: str, run_id: str, index: int) -> str:
    """The store key of one scored partition."""
    return f"{work_key(pipeline, run_id)}/{PARTS}/{index:05d}"


def output_key(config: ScoreConfig, run_id: str) -> str:
    """The store key a run commits its output under: ``<output>/<run id>``."""
    return run_key(config.output, run_id)
