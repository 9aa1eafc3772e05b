"""The ranges sampling parameters must lie in, written once for every entry point.

The API checks them on the request body (so a bad value is a 400 before anything is sent),
and tokenizer_proc on every GenerateRequest, since ZMQ clients reach it without the API: one
row's NaN or infinite logits would make the whole step's sampling fail, hurting every
request in the batch.
"""

from __future__ import annotations

import math
from typing import Any

# closed ranges [lo, hi]; top_p is (0, 1], checked on its own
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "min_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    # logits are divided (or multiplied) by it in fp32: near 0 or huge they overflow to inf
    "repetition_penalty": (0.01, 100.0),
}


def sampling_error(fields: Any) -> tuple[str, str] | None:
    """(message, param) of the first value out of range, or None. ``fields`` is a request body
    or a SamplingParams: anything with these attributes; None means "not given"."""
    for param in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        error = _range_error(fields, param)
        if error is not None:
            return error
    return _range_error(fields, "repetition_penalty")


def _range_error(fields: Any, param: str) -> tuple[str, str] | None:
    value = getattr(fields, param, None)
    if value is None:
        return None
    if not math.isfinite(value):
        return f"{param} must be a finite number, got {value}.", param
    if param == "top_p":
        return None if 0.0 < value <= 1.0 else (f"top_p must be in (0, 1], got {value}.", param)
    lo, hi = RANGES[param]
    return None if lo <= value <= hi else (f"{param} must be between {lo} and {hi}, got {value}.", param)
