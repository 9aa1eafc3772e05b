"""The tokenizer's logit_bias check, which ZMQ clients meet without the API's: ids in the
vocabulary, finite biases in [-100, 100]; each failure names the field."""

from __future__ import annotations

import math

import pytest

from zeroserve.tokenizer_proc.errors import TokenizerError
from zeroserve.tokenizer_proc.validation import check_logit_bias


def test_good_bias_passes():
    check_logit_bias({0: -100.0, 99: 100.0, 5: 0.0}, vocab_size=100)
    check_logit_bias(None, vocab_size=100)


@pytest.mark.parametrize(
    "bias", [{100: 1.0}, {-1: 1.0}, {5: math.inf}, {5: math.nan}, {5: -100.5}, {5: 101.0}]
)
def test_bad_bias_is_an_error_naming_logit_bias(bias):
    with pytest.raises(TokenizerError) as e:
        check_logit_bias(bias, vocab_size=100)
    assert e.value.param == "logit_bias"
