"""Shared fixtures: the packaged SmolLM2 GGUF, our tokenizer for it, and transformers' one.

transformers' GGUF tokenizer takes seconds to build, so it is made once per session.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from tokenizer_testdata import write_sentencepiece_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    return load_tokenizer(gguf_path)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    """transformers' tokenizer for the same GGUF: the reference.

    AutoTokenizer resolves this file to TokenizersBackend but first reads the whole GGUF with
    gguf.GGUFReader for the model config (~20 s on a loaded 2-core box); calling the class
    directly builds the same tokenizer in ~3 s (test_auto_tokenizer_is_the_same, slow).
    """
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return TokenizersBackend.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="session")
def sp_gguf(tmp_path_factory) -> str:
    return write_sentencepiece_gguf(str(tmp_path_factory.mktemp("sp") / "sp.gguf"))


@pytest.fixture(scope="session")
def sp_tokenizer(sp_gguf):
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    return load_tokenizer(sp_gguf)
