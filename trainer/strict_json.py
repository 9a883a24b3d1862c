"""JSON that strict readers take: a non-finite number (a NaN score, e.g. ``mode_kl_reverse`` before any
sample lies near a mode) is written as ``null``, not as the bare ``NaN`` Python writes by default, which
JavaScript (Grafana's JSON sources), jq and other strict parsers refuse or silently change. The
project's own readers that average records turn ``null`` back into NaN (``nan_for_null``)."""

from __future__ import annotations

import json
import math
from typing import IO, Any


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def dump(value: Any, f: IO[str], **kwargs: Any) -> None:
    f.write(dumps(value, **kwargs))


def nan_for_null(record: dict[str, Any]) -> dict[str, Any]:
    """A record read back, its null numbers NaN again, also inside lists such as [mean, std] (a mean over
    records then says NaN, not a TypeError)."""

    def number(v: Any) -> Any:
        return math.nan if v is None else v

    return {k: [number(x) for x in v] if isinstance(v, list) else number(v) for k, v in record.items()}
