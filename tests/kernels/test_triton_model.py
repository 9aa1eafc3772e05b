"""The Triton kernels inside a real model step: a tiny random Llama (GQA 2, Llama-3 rope
scaling) generates the same greedy tokens through ModelRunner with kernel_backend="triton"
(interpreted) as with the torch reference kernels.

This is what the unit tests cannot see: q/k as strided views of the fused qkv projection,
the [2, N, bs, Hkv, D] cache pools, slot mappings and block tables built by the runner,
chunked prefills (a 16-token budget splits the 21-token prompt, so the second chunk
attends over a cached prefix) and mixed prefill + decode steps.
"""

from __future__ import annotations

import json

import pytest
import torch

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
from zeroserve.launcher.inprocess import InProcessEngine
from zeroserve.shared.messages import SamplingParams

torch.set_num_threads(2)

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 128,
        "rope_type": "llama3",
    },
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama3")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return str(folder)


def recording(forward, into: list):
    def run(*args):
        hidden = forward(*args)
        into.append(hidden.clone())
        return hidden

    return run


def test_greedy_tokens_and_hidden_states_match_the_torch_kernels(model_dir):
    prompts = [[(7 * i + 3) % 250 + 3 for i in range(21)], [5, 9, 11], [100 + i for i in range(9)]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outputs, hidden = {}, {}
    for backend in ("torch", "triton"):
        runner = ModelRunner(
            RunnerConfig(
                model=model_dir,
                load_format="dummy",
                dtype="float32",
                block_size=16,
                num_kv_blocks=12,
                max_model_len=128,
                kernel_backend=backend,
                quantization="none",  # fp32 projections on both, as the comparison assumes
            )
        )
        assert runner.ops.name == backend
        with torch.no_grad():  # dummy weights (std 0.02) give near-uniform attention: sharpen it
            for name, param in runner.model.named_parameters():
                if "qkv_proj" in name:
                    param.mul_(10.0)
        hidden[backend] = []
        runner.forward = recording(runner.forward, hidden[backend])
        outputs[backend] = InProcessEngine(runner, max_num_batched_tokens=16).generate(prompts, params)
    assert outputs["triton"] == outputs["torch"]
    assert all(len(o) == 4 for o in outputs["torch"])
    assert len(hidden["triton"]) == len(hidden["torch"]) >= 5  # chunked prefills, then decodes
    for got, expected in zip(hidden["triton"], hidden["torch"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
