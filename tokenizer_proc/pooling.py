"""What the tokenizer checks about embedding requests (GenerateRequest.pooling), for every entry
point (HTTP API, ZMQ clients): the model facts the launcher resolved into EngineConfig
(``embedding_only``, ``embedding_size``, ``matryoshka_dimensions``) against the request.
The context length is the scheduler's to check (scheduler_proc/pooling.py)."""

from __future__ import annotations

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.messages import ErrorInfo, GenerateRequest

POOLING_MODES = ("model", "last", "mean", "cls", "max", "mean_sqrt_len")


def _invalid(message: str, param: str | None) -> ErrorInfo:
    return ErrorInfo(status=400, type="invalid_request_error", message=message, param=param)


def pooling_error(req: GenerateRequest, config: EngineConfig) -> ErrorInfo | None:
    """A 400 for a request this model cannot serve as asked, else None."""
    pooling = req.pooling
    if pooling is None:
        if config.embedding_only:
            return _invalid(
                f"The model `{config.served_model_name}` only serves embeddings (POST /v1/embeddings); "
                "it cannot generate text.",
                "model",
            )
        return None
    if pooling.pooling not in POOLING_MODES:
        return _invalid(
            f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling.pooling[:64]!r}.", "pooling"
        )
    dims = pooling.dimensions
    if dims is None:
        return None
    allowed = config.matryoshka_dimensions
    if allowed is None:
        return _invalid(
            f"The model `{config.served_model_name}` does not support `dimensions`: it was not trained "
            "for Matryoshka representations, so a shortened embedding would lose quality. Leave "
            "`dimensions` out.",
            "dimensions",
        )
    size = config.embedding_size
    if not 1 <= dims <= size or (allowed and dims not in allowed):
        sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {size}"
        return _invalid(f"dimensions must be one of {sizes} for this model, got {dims}.", "dimensions")
    return None
