"""Reading spec files: one file, every file of a pipelines folder, or the pipeline of a given name."""

from __future__ import annotations

from pathlib import Path

import yaml

from kiln.tasks.spec.base import SpecError
from kiln.tasks.spec.pipeline import PipelineSpec, parse_spec


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a spec file. A relative ``source.uri`` is resolved against the file's folder.

    Raises:
        SpecError: unreadable file, bad YAML, or invalid fields; the message names the file and each field.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    if isinstance(data, dict) and isinstance(data.get("source"), dict):
        uri = data["source"].get("uri")
        if isinstance(uri, str) and "://" not in uri and not Path(uri).is_absolute():
            data["source"] = {**data["source"], "uri": str((path.parent / uri).resolve())}
    return parse_spec(data, str(path))


def discover_specs(folder: str | Path) -> list[Path]:
    """Spec files in ``folder`` (``*.yaml`` / ``*.yml``), sorted; files starting with ``_`` or ``.`` are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".yaml", ".yml") and not p.name.startswith(("_", ".")))


def load_specs(folder: str | Path) -> tuple[list[tuple[Path, PipelineSpec]], list[SpecError]]:
    """Load every spec in ``folder``: the valid ones, and one error per invalid file (never raises for a file).

    Two files declaring the same ``name`` make the later one (by file name) an error.
    """
    valid: list[tuple[Path, PipelineSpec]] = []
    errors: list[SpecError] = []
    seen: dict[str, Path] = {}
    for path in discover_specs(folder):
        try:
            spec = load_spec(path)
        except SpecError as exc:
            errors.append(exc)
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
