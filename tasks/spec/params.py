"""Trigger-time Params: the spec fields a run may override, described from the spec fields themselves.

Each Param's type, bounds, choices, title and description come from the pydantic field it overrides (so a new
tunable field is one entry in :data:`~kiln.tasks.spec.pipeline.PARAM_FIELDS`), and its default is the value this
pipeline's spec gives that field. The DAG factory turns the schemas into Airflow ``Param`` objects.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel

from kiln.tasks.spec.pipeline import PARAM_FIELDS, PipelineSpec

#: The JSON-schema keywords a Param takes from its field.
_KEYWORDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "title")


#: Refuses NaN, which JSON-schema bounds cannot: NaN compares false with everything, so it passes every
#: ``minimum`` and ``maximum``, and it is the only value that is both above 0 and at most 0 by those rules.
#: (Infinities are refused by the field's bounds; the spec model refuses both again.)
_NAN = {"exclusiveMinimum": 0, "maximum": 0}


def param_schemas(spec: PipelineSpec) -> dict[str, dict[str, Any]]:
    """Per Param: ``default`` (this spec's value), the JSON-schema keywords of its field, and ``description_md``."""
    out: dict[str, dict[str, Any]] = {}
    for name, path in PARAM_FIELDS.items():
        model: type[BaseModel] = PipelineSpec
        value: Any = spec
        for part in path[:-1]:
            value = getattr(value, part)
            model = type(value)
        if value is None:  # an optional section this spec leaves out (tuning): its Params do not apply
            continue
        field = path[-1]
        schema = _properties(model)[field]
        info = model.model_fields[field]
        out[name] = {"default": getattr(value, field), **{k: schema[k] for k in _KEYWORDS if k in schema}}
        if path == ("tuning", "parallel"):  # the DAG's mapped-task limit is the spec's value
            out[name]["maximum"] = getattr(value, field)
        if out[name].get("type") == "number":
            out[name]["not"] = _NAN
        if info.description:
            out[name]["description_md"] = _markdown(info.description)
    return out


@functools.cache
def _properties(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of each field of a spec section (built once per section: the DAG file parses often)."""
    return model.model_json_schema(mode="validation")["properties"]


def _markdown(docstring: str) -> str:
    """A field docstring as one Markdown paragraph (``code`` in reStructuredText is `code` in Markdown)."""
    return re.sub(r"``([^`]+)``", r"`\1`", " ".join(docstring.split()))


#: The scoring DAG's Params (:func:`scoring_param_schemas`): the input, the version, the output prefix, and the
#: ``scoring`` fields a run may override.
SCORING_PARAMS = ("input", "version", "partition_rows", "output")


def scoring_param_schemas(spec: PipelineSpec) -> dict[str, dict[str, Any]]:
    """The ``<pipeline>_score`` DAG's Params, as :func:`param_schemas` gives the pipeline's: ``partition_rows``
    from its ``scoring`` field (type, bounds, description, this spec's value as the default); ``input`` (a source
    section like the spec's ``source``, default the spec's own source), ``version`` and ``output``."""
    from kiln.tasks.spec.scoring import ScoringSpec

    field = "partition_rows"
    schema = _properties(ScoringSpec)[field]
    rows = {"default": spec.scoring.partition_rows, **{k: schema[k] for k in _KEYWORDS if k in schema}}
    description = ScoringSpec.model_fields[field].description
    if description:
        rows["description_md"] = _markdown(description)
    source = spec.source.model_dump(mode="json", exclude_none=True, exclude={"watch", "incremental"})
    return {
        "input": {"default": source, "type": "object", "title": "Input",
                  "description_md": "The data to score, written as the spec's `source` section: `{\"uri\": ...}` "
                                    "(a path under the data roots, `file://`, `s3://bucket/key` or prefix, "
                                    "`pkg://`) with `format`, `header`, `column_names` for files, or "
                                    "`{\"sql\": {\"conn_id\": ..., \"query\": ...}}`."},
        "version": {"default": "champion", "type": "string", "title": "Model version", "minLength": 1,
                    "maxLength": 20, "pattern": r"^(champion|[1-9][0-9]{0,17})$",
                    "description_md": "`champion` (the version the alias names when the run starts) or a registered "
                                      "version number."},
        field: rows,
        "output": {"default": f"{spec.name}/scores", "type": "string", "title": "Output prefix", "minLength": 1,
                   "maxLength": 500,
                   "description_md": f"Artifact-store prefix of the outputs, under `{spec.name}/`: each run writes "
                                     "`<output>/<run id>/` (predictions, rejects, `manifest.json`)."},
    }
