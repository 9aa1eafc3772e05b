"""The tokenizer's checks of embedding requests against the model (tokenizer_proc/pooling.py)."""

from __future__ import annotations

import msgspec
import pytest

from zeroserve.shared.config import EngineConfig
from zeroserve.shared.messages import GenerateRequest, PoolingParams, SamplingParams
from zeroserve.tokenizer_proc.pooling import pooling_error

BASE = EngineConfig(model="/m", served_model_name="emb", run_dir="/tmp/r", embedding_size=768)


def req(pooling: PoolingParams | None) -> GenerateRequest:
    return GenerateRequest(request_id="r", params=SamplingParams(), prompt="hi", pooling=pooling)


@pytest.mark.parametrize(
    ("matryoshka", "dims", "param"),
    [
        (None, None, None),  # no dimensions asked: fine for any model
        (None, 64, "dimensions"),  # not trained for Matryoshka: refused
        ([], 64, None),  # any size
        ([], 769, "dimensions"),  # past the model's width
        ([768, 512, 256], 256, None),
        ([768, 512, 256], 300, "dimensions"),  # only the trained sizes
    ],
)
def test_dimensions_against_the_model(matryoshka, dims, param):
    config = msgspec.structs.replace(BASE, matryoshka_dimensions=matryoshka)
    error = pooling_error(req(PoolingParams(dimensions=dims)), config)
    assert (error.param if error else None) == param
    if error is not None:
        assert error.status == 400


def test_an_embedding_only_model_refuses_generation_and_a_decoder_does_both():
    only = msgspec.structs.replace(BASE, embedding_only=True)
    error = pooling_error(req(None), only)
    assert error.status == 400 and "only serves embeddings" in error.message
    assert pooling_error(req(PoolingParams()), only) is None
    assert pooling_error(req(None), BASE) is None and pooling_error(req(PoolingParams()), BASE) is None


def test_an_unknown_pooling_is_refused():
    assert pooling_error(req(PoolingParams(pooling="median")), BASE).param == "pooling"
