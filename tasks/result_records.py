"""Reading a task's predictions for scoring: ``{id: value}`` from a mapping or a list of JSON records."""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Union


def records_by_id(predictions: Union[Mapping[int, Any], Sequence[Mapping]], id_key: str, value_key: str,
                  string_value: bool = False) -> dict[int, Any]:
    """``{int(id): value}`` from a mapping or from ``[{id_key: ..., value_key: ...}]`` records (with
    ``string_value``, each value must be a string); a malformed record or a repeated id is a
    ``ValueError`` naming the record's index."""
    if isinstance(predictions, Mapping):
        return {int(k): v for k, v in predictions.items()}
    out: dict[int, Any] = {}
    for i, rec in enumerate(predictions):
        ok = isinstance(rec, Mapping) and id_key in rec and (
            isinstance(rec.get(value_key), str) if string_value else value_key in rec)
        if not ok:
            kind = "a string " if string_value else ""
            raise ValueError(f"prediction {i} must be an object with '{id_key}' and {kind}'{value_key}'; got {rec!r}")
        key = int(rec[id_key])
        if key in out:
            raise ValueError(f"prediction {i}: {id_key} {key} appears more than once")
        out[key] = rec[value_key]
    return out
