"""A ``POST /jobs`` form → what to run: the model, the :class:`.params.SegmentParams` and the inputs
in the bundle's channel order.

Parameters are read through the same field table as the ``segment`` flags (:data:`.params.FIELDS`):
a field is named like the flag (``min-lesion-ml`` or ``min_lesion_ml``, ``heatmap`` or ``heatmaps``)
and holds its value as text. ``model`` is not a run parameter; ``device`` and ``threads`` belong to
the server (:attr:`.params.Field.server_owned`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UNetSegmentError, UsageError
from ..params import ALIASES, FIELD, FIELDS, SegmentParams, field_name
from .problems import HTTPProblem

#: file fields that carry inputs in channel order rather than by channel name
POSITIONAL_FIELDS = ("input", "inputs", "file", "files")


def _unknown_field(raw: str) -> HTTPProblem:
    names = sorted({"model", *(f.name for f in FIELDS if not f.server_owned), *ALIASES})
    return HTTPProblem(400, f"unknown form field {raw[:60]!r}",
                       "send files named after the model's channels (or 'input'), and parameters named like the segment "
                       "flags: " + ", ".join(names))


def params_from_fields(fields: list[tuple[str, str]], default_model: str, defaults: SegmentParams) -> tuple[str, SegmentParams]:
    """(model, parameters) from form fields ``(name, text)``, over the server's defaults; 400 for an unknown
    field, a parameter given twice, a server-owned one or a bad value."""
    values: dict[str, str] = {}
    for raw, value in fields:
        name = field_name(raw)
        if name != "model" and name not in FIELD:
            raise _unknown_field(raw)
        if name in values:
            raise HTTPProblem(400, f"parameter {name} given twice", "send each parameter once")
        values[name] = value
    model = values.pop("model", default_model)
    try:
        return model, SegmentParams.from_mapping(values, base=defaults, allow_server_owned=False)
    except UsageError as e:  # a bad value, or a parameter the server owns
        raise HTTPProblem(400, f"bad parameter: {e.problem}", e.fix or "") from None


def map_uploads(files: list[tuple[str, Path, str]], channels: list[str]) -> list[Path]:
    """The stored uploads ``(field name, path, client name)`` in the bundle's channel order: each file field
    named after its channel (any case) or a positional ``input`` field; 400 naming what does not fit."""
    from .job import map_inputs

    lower = {c.lower(): c for c in channels}
    tokens = []
    for fieldname, path, _client in files:
        key = fieldname.strip().lower()
        if key in POSITIONAL_FIELDS:
            tokens.append(str(path))
        elif key in lower:
            tokens.append(f"{lower[key]}={path}")
        else:
            raise HTTPProblem(400, f"file field {fieldname[:60]!r} is not one of this model's channels ({', '.join(channels)})",
                              "name each file after its channel, or send them as 'input' fields in channel order")
    if not tokens:
        return []
    try:
        return map_inputs(tokens, channels)
    except UNetSegmentError as e:
        raise HTTPProblem(400, e.problem, e.fix or "") from None
