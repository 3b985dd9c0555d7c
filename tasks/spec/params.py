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
