"""Reading spec files: one file, every file of a pipelines folder, or the pipeline of a given name.

Each file is read within :data:`~kiln.tasks.spec.yaml_reader.SPEC_LIMITS` (size, depth, alias expansion, its own
time budget) and its ``source.uri`` is checked against the data roots, so a hostile or broken file is named as
an error and never stalls or hides the other pipelines.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kiln.tasks.spec.base import SpecError
from kiln.tasks.spec.pipeline import PipelineSpec, parse_spec
from kiln.tasks.spec.sources import (
    SourceError,
    check_file_in_roots,
    data_roots,
    is_package_uri,
    is_s3_uri,
    package_parts,
    s3_parts,
)
from kiln.tasks.spec.yaml_reader import SPEC_LIMITS, SpecLimits, read_spec_yaml

log = logging.getLogger(__name__)


def load_spec(path: str | Path, limits: SpecLimits = SPEC_LIMITS) -> PipelineSpec:
    """Read and validate a spec file. A relative ``source.uri`` is resolved against the file's folder; a file
    source must lie inside the data roots (``kiln.tasks.spec.sources``).

    Raises:
        SpecError: unreadable or oversized file, bad YAML, a limit crossed, or invalid fields; the message names
            the file and each field.
    """
    path = Path(path)
    data = read_spec_yaml(path, limits)
    problem = None
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, dict) and isinstance(source.get("uri"), str) and source["uri"]:
        try:
            data["source"] = {**source, "uri": check_source_uri(source["uri"], path.parent)}
        except SourceError as exc:
            problem = f"field 'source.uri': {exc}"
    problems = [problem] if problem else []
    if isinstance(data, dict):
        code_problem = _resolve_code_path(data, path.parent)
        if code_problem:
            problems.append(code_problem)
    try:
        spec = parse_spec(data, str(path))
    except SpecError as exc:
        raise SpecError(exc.source, [*problems, *exc.problems]) from None
    if problems:
        raise SpecError(str(path), problems)
    return spec


def _resolve_code_path(data: dict, spec_dir: Path) -> str | None:
    """Make ``code.path`` absolute against ``spec_dir`` (default: the folder named as the pipeline beside the spec,
    when it exists), in place; the problem with it, if any. Only the folder is checked here: its modules are
    imported where the training job runs (the image may hold requirements this machine lacks)."""
    code = data.get("code")
    if code is None:
        code = {}
    if not isinstance(code, dict):
        return None  # parse_spec names the wrong type
    given = code.get("path")
    if given is None:
        name = data.get("name")
        default = spec_dir / name if isinstance(name, str) and name and "/" not in name else None
        if default is not None and default.is_dir():
            data["code"] = {**code, "path": str(default.resolve())}
        return None
    if not isinstance(given, str) or not given:
        return None  # parse_spec names the wrong type
    folder = (spec_dir / Path(given).expanduser()).resolve()
    if not folder.is_dir():
        return (f"field 'code.path': {given!r} is not a folder (resolved against the spec file's folder to "
                f"{folder}); point it at the folder holding the pipeline's code")
    data["code"] = {**code, "path": str(folder)}
    return None


def check_source_uri(uri: str, spec_dir: Path | None) -> str:
    """``uri`` as the spec keeps it (a relative path made absolute against ``spec_dir``), checked to name a file
    inside the data roots or a well-formed ``pkg://`` resource (which only ``ingest`` can look up: the package
    must be installed where the step runs, not necessarily where the DAG file is parsed). The scoring DAG checks
    its ``input`` Param with it too.

    Raises:
        SourceError: a malformed URI, or a path outside the data roots.
    """
    if is_package_uri(uri):
        package_parts(uri)
        return uri
    if is_s3_uri(uri):
        s3_parts(uri)
        return uri
    if "://" not in uri and not Path(uri).expanduser().is_absolute() and spec_dir is not None:
        uri = str((spec_dir / uri).resolve())
    check_file_in_roots(uri, data_roots(spec_dir))
    return uri


def discover_specs(folder: str | Path) -> list[Path]:
    """Spec files in ``folder`` (``*.yaml`` / ``*.yml``), sorted; files starting with ``_`` or ``.`` are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(("_", ".")))


def load_specs(folder: str | Path, limits: SpecLimits = SPEC_LIMITS,
               ) -> tuple[list[tuple[Path, PipelineSpec]], list[SpecError]]:
    """Load every spec in ``folder``: the valid ones, and one error per invalid file (never raises for a file).

    Each file gets its own ``limits`` (its own time budget). Two files declaring the same ``name`` make the later
    one (by file name) an error.
    """
    valid: list[tuple[Path, PipelineSpec]] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    for path in discover_specs(folder):
        try:
            spec = load_spec(path, limits)
        except SpecError as exc:
            errors.append(exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one file's surprise must not hide the other pipelines
            log.exception("unexpected error reading spec %s", path)
            errors.append(SpecError(str(path), [f"cannot be read ({type(exc).__name__}: {exc}); fix the file"]))
            continue
        if spec.name in seen:
            errors.append(SpecError(str(path), [f"field 'name': '{spec.name}' is already used by {seen[spec.name]}; "
                                                "each pipeline needs a unique name"]))
            continue
        seen[spec.name] = path
        valid.append((path, spec))
    return valid, errors


def spec_named(name: str, folder: str | Path | None = None) -> PipelineSpec:
    """The valid spec whose ``name`` is ``name`` in ``folder`` (default: ``KILN_PIPELINES_DIR``).

    Raises:
        LookupError: no valid spec has that name (the message lists the ones that do exist).
    """
    from kiln.tasks.settings import get_settings

    folder = Path(folder or get_settings().pipelines_dir)
    specs = {spec.name: spec for _, spec in load_specs(folder)[0]}
    if name not in specs:
        raise LookupError(f"no pipeline named '{name}' in {folder}; pipelines: {', '.join(sorted(specs)) or 'none'}")
    return specs[name]
