"""Embeddings on the worker, through the real scheduler (InProcessEngine):

- the BERT encoder (models/bert.py) on the packaged all-MiniLM-L6-v2 equals
  sentence-transformers' own encode() for a batch of inputs of mixed lengths;
- a decoder (the packaged SmolLM2 GGUF, --quantization none: transformers' values) pools its
  last hidden states as transformers computes them (last token, mean), normalised;
- a sentence-transformers folder's modules say how to pool (loader/sentence_transformers.py).

transformers' GGUF load takes ~30 s here, so its pooled vectors are cached under
zeroserve.shared.env.cache_dir(), keyed by the file's hash, the transformers version and the
prompts' token ids (as tests/gpu_worker/test_smollm2_gguf.py does).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(2)

from zeroserve.gpu_worker.loader import InvalidConfigError, load_model_config  # noqa: E402
from zeroserve.gpu_worker.loader.sentence_transformers import read_sentence_transformer_config  # noqa: E402
from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.launcher.inprocess import InProcessEngine  # noqa: E402
from zeroserve.shared import env  # noqa: E402
from zeroserve.shared.messages import EngineRequest, PoolingParams, SamplingParams  # noqa: E402

TEXTS = [
    "A man is eating food.",
    "The new movie is awesome, though the ending was a little too predictable for my taste.",
    "x",
    " ".join(["Embeddings of long inputs must see every token of their input and no other."] * 14),
    "Ünïcödé, emoji 🙂 and CJK 漢字 go through the WordPiece tokenizer too.",
]


def embed_all(
    engine: InProcessEngine, prompts: list[list[int]], pooling: list[PoolingParams]
) -> list[np.ndarray]:
    """Every prompt as one embedding request, all queued at once; their vectors in order."""
    for i, (ids, p) in enumerate(zip(prompts, pooling, strict=True)):
        engine.scheduler.add_request(
            EngineRequest(
                request_id=f"e{i}",
                prompt_token_ids=ids,
                params=SamplingParams(max_tokens=1),
                arrival_time=time.time(),
                pooling=p,
            )
        )
    out: dict[str, np.ndarray] = {}
    while (step := engine.step()) is not None:
        assert not step.result.sampled_token_ids  # nothing is sampled for an embedding
        for d in step.deltas:
            assert d.error is None and d.finish_reason == "stop" and not d.token_ids
            out[d.request_id] = np.frombuffer(d.embedding, dtype="<f4")
    return [out[f"e{i}"] for i in range(len(prompts))]


def cosines(a: list[np.ndarray], b) -> list[float]:
    return [float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b, strict=True)]


# --------------------------------------------------------------------------- BERT


def test_bert_batch_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(minilm, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    prompts = [tok.encode(t).ids for t in TEXTS]
    assert prompts[3][0] == 101 and prompts[3][-1] == 102 and len(prompts[3]) > 200  # [CLS] ... [SEP]
    # auto: float weights kept for an encoder, whatever the CPU (int8 would show in every vector)
    runner = ModelRunner(RunnerConfig(model=minilm, max_model_len=256, num_threads=2))
    assert runner.quantization == "none" and runner.kv_caches == []
    engine = InProcessEngine(runner)
    got = embed_all(engine, prompts, [PoolingParams()] * len(prompts))
    want = st.SentenceTransformer(minilm, device="cpu").encode(TEXTS)
    assert min(cosines(got, want)) > 0.9999
    assert np.abs(np.stack(got) - want).max() < 1e-4
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in got)  # its Normalize module
    # one at a time: the same vectors (the padding of a mixed batch changes nothing)
    alone = [embed_all(engine, [p], [PoolingParams()])[0] for p in prompts[:3]]
    assert np.abs(np.stack(alone) - np.stack(got[:3])).max() < 1e-5
    # Matryoshka-style cut and raw vectors, as a request may ask
    cut, raw = embed_all(
        engine, [prompts[1]] * 2, [PoolingParams(dimensions=16), PoolingParams(normalize=False)]
    )
    assert cut.shape == (16,) and abs(np.linalg.norm(cut) - 1) < 1e-5
    assert np.allclose(cut, raw[:16] / np.linalg.norm(raw[:16]), atol=1e-6)
    assert np.allclose(raw / np.linalg.norm(raw), got[1], atol=1e-5) and abs(np.linalg.norm(raw) - 1) > 0.01
    engine.scheduler.check_invariants()
    assert engine.scheduler.num_free_blocks == runner.num_kv_blocks


def test_minilm_config(minilm):
    cfg = load_model_config(minilm)
    assert (cfg.architecture, cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (
        "bert",
        384,
        6,
        512,
    )
    st = cfg.sentence_transformer
    assert (st.pooling, st.normalize, st.max_seq_length) == ("mean", True, 256)
    assert cfg.matryoshka_dimensions is None  # not trained for it: `dimensions` is refused


def test_serving_a_sentence_transformers_folder_resolves_its_facts(minilm, tmp_path):
    from zeroserve.launcher.engine_args import config_from_args
    from zeroserve.launcher.readme_flags import serve_parser

    def parse(*flags: str):
        args = serve_parser().parse_args(
            [minilm, "--run-dir", str(tmp_path / "run"), "--device", "cpu", *flags]
        )
        return config_from_args(args)

    config = parse()
    # max_seq_length (256), not the 512 positions: sentence-transformers cuts inputs there
    assert (config.max_model_len, config.embedding_only, config.embedding_size) == (256, True, 384)
    assert (config.pooling, config.matryoshka_dimensions, config.served_model_name) == (
        "auto",
        None,
        "all-MiniLM-L6-v2",
    )
    assert parse("--max-model-len", "512", "--pooling", "cls").max_model_len == 512  # the positions allow it
    with pytest.raises(SystemExit):
        parse("--max-model-len", "513")


def _folder(tmp_path, pooling: dict, normalize: bool) -> str:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 8, **pooling})
    )
    return str(tmp_path)


@pytest.mark.parametrize(
    ("pooling", "normalize", "want"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, False, "cls"),
        ({"pooling_mode_lasttoken": True}, True, "last"),
        ({"pooling_mode": "lasttoken"}, True, "last"),  # sentence-transformers >= 5 writes a string
        ({"pooling_mode": ["max"]}, False, "max"),
    ],
)
def test_sentence_transformer_pooling_modes(tmp_path, pooling, normalize, want):
    st = read_sentence_transformer_config(_folder(tmp_path, pooling, normalize))
    assert (st.pooling, st.normalize, st.max_seq_length) == (want, normalize, None)


def test_concatenated_poolings_are_refused(tmp_path):
    folder = _folder(tmp_path, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, True)
    with pytest.raises(InvalidConfigError, match="exactly one of"):
        read_sentence_transformer_config(folder)


def test_a_module_it_does_not_run_is_refused_not_skipped(tmp_path):
    folder = _folder(tmp_path, {"pooling_mode_mean_tokens": True}, True)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(InvalidConfigError, match="sentence_transformers.models.Dense"):
        read_sentence_transformer_config(folder)


def test_a_plain_hf_folder_has_no_sentence_transformer_config(tmp_path):
    assert read_sentence_transformer_config(str(tmp_path)) is None


# --------------------------------------------------------------------------- a decoder

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"]


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def decoder_prompts(gguf_path) -> list[list[int]]:
    from zeroserve.tokenizer_proc.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf_path)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_pooled(request, gguf_path, decoder_prompts) -> dict[str, list[list[float]]]:
    """transformers' last hidden state (after the final norm) of each prompt: its last row and
    its mean, normalised (cached, see the module docstring)."""
    try:
        tf_version = version("transformers")
    except PackageNotFoundError:
        pytest.skip("transformers is not installed")
    key = hashlib.sha256(
        json.dumps([_file_sha256(gguf_path), tf_version, decoder_prompts]).encode()
    ).hexdigest()
    cache = os.path.join(env.cache_dir(), "test-references", f"hf-smollm2-pooled-{key[:24]}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    model = request.getfixturevalue("hf_smollm2")
    out: dict[str, list[list[float]]] = {"last": [], "mean": []}
    with torch.inference_mode():
        for ids in decoder_prompts:
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            out["last"].append(torch.nn.functional.normalize(hidden[-1], dim=0).tolist())
            out["mean"].append(torch.nn.functional.normalize(hidden.mean(0), dim=0).tolist())
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(cache + ".tmp", cache)
    return out


def test_decoder_pooling_equals_transformers_hidden_states(gguf_path, decoder_prompts, hf_pooled):
    runner = ModelRunner(
        RunnerConfig(model=gguf_path, max_model_len=256, num_kv_blocks=64, quantization="none", num_threads=2)
    )
    engine = InProcessEngine(runner)
    # "model" on a decoder: --pooling auto = the last token, normalised
    both = [*decoder_prompts, *decoder_prompts]
    pooling = [PoolingParams()] * 2 + [PoolingParams(pooling="mean")] * 2
    got = embed_all(engine, both, pooling)
    assert min(cosines(got[:2], hf_pooled["last"])) > 0.9999
    assert min(cosines(got[2:], hf_pooled["mean"])) > 0.9999
    assert np.abs(np.stack(got[:2]) - np.array(hf_pooled["last"])).max() < 1e-4
    # generation on the same engine afterwards: its first plan makes the worker forget them
    held: list[int] = []
    out = engine.generate(
        [decoder_prompts[0]],
        SamplingParams(max_tokens=2, temperature=0),
        on_step=lambda s: held.append(runner.num_requests),
    )
    assert held[0] == 1 and len(out[0]) == 2
    engine.scheduler.check_invariants()
