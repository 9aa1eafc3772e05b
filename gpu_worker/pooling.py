"""Embedding requests on the worker: their rows of the step's hidden states -> one vector each.

An embedding request (``RequestState.pooling``) is prefilled and never sampled. The scheduler
sends its whole prompt in one step (an encoder's attention is bidirectional, and mean / cls /
max pooling need every token's hidden state), so its rows in the flat hidden states are
exactly its tokens::

    hidden  | gen req (sampled) | emb req e0 e1 e2 e3 | decode |
    rows                          start ...... end-1
    last: hidden[end-1]   cls: hidden[start]   mean: mean(hidden[start:end])   max: per column

Then ``dimensions`` (Matryoshka: keep the first N), then L2 normalisation when asked. The
vector leaves as float32 little-endian bytes (StepResult.pooled).

Which pooling: the request's PoolingParams ("model" = the model's), else the model's own
(``--pooling``; ``auto``: a sentence-transformers folder's Pooling and Normalize modules;
otherwise the last token, normalised, as vLLM does for decoders; CLS for a bare BERT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zeroserve.gpu_worker.input_batch import RequestState, ScheduledRequest
from zeroserve.gpu_worker.loader import ModelConfig
from zeroserve.shared.messages import PooledOutput

POOLING_FLAG_CHOICES = ("auto", "last", "mean", "cls")


@dataclass(frozen=True)
class PoolingDefault:
    mode: str  # last | mean | cls | max | mean_sqrt_len
    normalize: bool

    @classmethod
    def of(cls, cfg: ModelConfig, flag: str = "auto") -> PoolingDefault:
        """The model's pooling under ``--pooling flag``."""
        if flag != "auto":
            return cls(flag, True)
        st = cfg.sentence_transformer
        if st is not None:
            return cls(st.pooling, st.normalize)
        return cls("cls" if cfg.is_encoder else "last", True)


@dataclass
class PoolingRows:
    state: RequestState
    start: int  # its first row in the step's hidden states
    end: int  # one past its last row
    first_position: int  # the position of row `start` (0 unless a decoder's prompt was chunked)


def take_pooling_rows(scheduled: list[ScheduledRequest]) -> list[PoolingRows]:
    """The embedding requests that finish their prompt this step, with their rows; they are
    marked as not sampling, so no logits are computed for them."""
    out, row = [], 0
    for item in scheduled:
        n = item.num_new_tokens
        if item.samples and item.state.pooling is not None:
            item.samples = False
            out.append(PoolingRows(item.state, row, row + n, item.state.num_computed_tokens))
        row += n
    return out


def pool(hidden: torch.Tensor, rows: list[PoolingRows], default: PoolingDefault) -> list[PooledOutput]:
    """hidden [T, H] (the model's last hidden states) -> one PooledOutput per entry of ``rows``."""
    out = []
    for r in rows:
        params = r.state.pooling
        mode = default.mode if params.pooling == "model" else params.pooling
        normalize = default.normalize if params.normalize is None else params.normalize
        if mode != "last" and r.first_position != 0:
            raise RuntimeError(
                f"request {r.state.request_id!r}: {mode} pooling needs the whole prompt in one step, "
                f"but this step starts at token {r.first_position}"
            )
        h = hidden[r.start : r.end].float()
        if mode == "last":
            v = h[-1]
        elif mode == "cls":
            v = h[0]
        elif mode == "mean":
            v = h.mean(0)
        elif mode == "max":
            v = h.max(0).values
        elif mode == "mean_sqrt_len":
            v = h.sum(0) / float(h.shape[0]) ** 0.5
        else:
            raise ValueError(f"request {r.state.request_id!r}: unknown pooling {mode!r}")
        if params.dimensions is not None:
            v = v[: params.dimensions]
        if normalize:
            v = F.normalize(v, dim=0)
        data = v.cpu().numpy().astype("<f4", copy=False).tobytes()
        out.append(PooledOutput(request_id=r.state.request_id, data=data))
    return out


def decode_embedding(data: bytes) -> np.ndarray:
    """PooledOutput.data / TextDelta.embedding -> float32 array."""
    return np.frombuffer(data, dtype="<f4")
