"""Greedy tokens equal Hugging Face transformers' on tiny random models of every family.

Each model is a random transformers model saved with save_pretrained into a temp folder and
loaded by the ModelRunner through the real loader. HF's generate(do_sample=False) on each
prompt alone is the reference; the runner is driven by the real scheduler in-process
(launcher.inprocess): one sequence, a ragged batch (all at once and under a tight token
budget that mixes chunked prefills with decodes), a prefill in 3 chunks, and a request whose
prefix is already in the cache (num_computed_tokens > 0, blocks reused). Each test checks
from the plans that the scheduler really drove the runner that way.

initializer_range=0.2 makes the random models' greedy outputs varied (at 0.02 they repeat
one token) with a top-2 logit margin ~1e-2, far above fp32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)  # tiny matmuls: a second thread costs more than it gives

transformers = pytest.importorskip("transformers")

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.launcher.inprocess import EngineStep, InProcessEngine  # noqa: E402
from zeroserve.shared.messages import SamplingParams, StepPlan  # noqa: E402

NUM_TOKENS = 32
BLOCK_SIZE = 8  # small, so prompts and chunks cross block boundaries
GREEDY = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
PROMPT_LENS = [1, 3, 8, 9, 15, 17, 31, 40]

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 10000.0,
}

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_rope_llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    ),
    "llama_untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=16)),
}


def hf_greedy(model, prompt: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NUM_TOKENS,
        min_new_tokens=NUM_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


class Case:
    def __init__(self, name: str, folder: str):
        config_cls, model_cls, extra = CASES[name]
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**COMMON, **extra)
        self.hf = getattr(transformers, model_cls)(config).eval()
        self.hf.save_pretrained(folder)
        gen = torch.Generator().manual_seed(1)
        self.prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]
        # shares the 40-token prompt's first 32 tokens (4 full blocks), then diverges
        self.prefix_prompt = self.prompts[-1][:32] + [7, 70, 170]
        with torch.inference_mode():
            self.expected = [hf_greedy(self.hf, p) for p in self.prompts]
            self.expected_prefix = hf_greedy(self.hf, self.prefix_prompt)
        # quantization none: fp32 weights as transformers has them (the CPU default quantizes)
        self.runner = ModelRunner(
            RunnerConfig(model=folder, block_size=BLOCK_SIZE, num_kv_blocks=128, quantization="none")
        )


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_outputs_are_varied(case):
    """Guards the test itself: a model that repeats one token would prove little."""
    assert len({t for out in case.expected for t in out}) > 40


def run(runner, prompts, **limits) -> tuple[list[list[int]], list[StepPlan]]:
    """Greedy outputs through a fresh in-process engine, and the plans it ran."""
    steps: list[EngineStep] = []
    outputs = InProcessEngine(runner, **limits).generate(prompts, GREEDY, on_step=steps.append)
    return outputs, [s.plan for s in steps]


def step_kinds(plans: list[StepPlan]) -> list[set[str]]:
    """Per plan, what its rows did: "chunk" (a prefill that stops short of the prompt's end),
    "prefill" (one that reaches it), "decode" (one token after the prompt)."""
    prompt_len: dict[str, int] = {}
    computed: dict[str, int] = {}
    kinds = []
    for plan in plans:
        here = set()
        prompt_len.update((n.request_id, n.num_prompt_tokens) for n in plan.new)
        rows = [(n.request_id, n.num_computed_tokens, n.num_new_tokens) for n in plan.new]
        rows += [(r.request_id, computed[r.request_id], r.num_new_tokens) for r in plan.running]
        for rid, start, num_new in rows:
            end = computed[rid] = start + num_new
            if start >= prompt_len[rid]:
                here.add("decode")
            else:
                here.add("chunk" if end < prompt_len[rid] else "prefill")
        kinds.append(here)
    return kinds


def test_single_sequence(case):
    outputs, plans = run(case.runner, [case.prompts[-1]])
    assert outputs == [case.expected[-1]]
    assert step_kinds(plans) == [{"prefill"}] + [{"decode"}] * (NUM_TOKENS - 1)


def test_ragged_batch(case):
    engine = InProcessEngine(case.runner)
    steps: list[EngineStep] = []
    assert engine.generate(case.prompts, GREEDY, on_step=steps.append) == case.expected
    first = steps[0].plan  # every prompt, whole, in one step of 8 ragged rows
    assert sorted(n.num_new_tokens for n in first.new) == PROMPT_LENS
    assert all(n.num_computed_tokens == 0 for n in first.new)
    # the worker forgets finished requests when the next plan says so
    assert case.runner.num_requests == len(PROMPT_LENS)
    engine.generate([case.prompts[0]], GREEDY)
    assert case.runner.num_requests == 1


def test_ragged_batch_mixed_steps(case):
    """A 20-token budget: prefills are chunked and share steps with other rows' decodes."""
    outputs, plans = run(case.runner, case.prompts, max_num_batched_tokens=20)
    assert outputs == case.expected
    assert any({"chunk", "decode"} <= kinds for kinds in step_kinds(plans))


def test_prefill_in_three_chunks(case):
    outputs, plans = run(case.runner, [case.prompts[-1]], max_num_batched_tokens=14)
    chunks = [r.num_new_tokens for plan in plans for r in [*plan.new, *plan.running]]
    assert chunks[:3] == [14, 14, 12] and set(chunks[3:]) == {1}  # 40 tokens -> 14, 14, 12
    assert outputs == [case.expected[-1]]


def test_prefix_reuse(case):
    """A second request computes only its tail over blocks the first one filled."""
    engine = InProcessEngine(case.runner)
    steps: list[EngineStep] = []
    assert engine.generate([case.prompts[-1]], GREEDY, on_step=steps.append) == [case.expected[-1]]
    prefix_blocks = steps[0].plan.new[0].block_ids[:4]  # tokens 0..31
    steps.clear()
    assert engine.generate([case.prefix_prompt], GREEDY, on_step=steps.append) == [case.expected_prefix]
    second = steps[0].plan.new[0]
    assert second.num_computed_tokens == 32 and second.num_new_tokens == 3
    assert second.block_ids[:4] == prefix_blocks
    assert steps[0].deltas[0].num_cached_tokens == 32


def test_torch_reference_kernels_give_the_same_tokens(case, tmp_path):
    """The runner defaults to the C++ CPU kernels; the torch reference (the oracle of the
    kernel tests) must also reproduce HF through the whole model."""
    runner = ModelRunner(
        RunnerConfig(
            model=case.runner.config.model,
            block_size=BLOCK_SIZE,
            num_kv_blocks=128,
            kernel_backend="torch",
            quantization="none",
        )
    )
    assert runner.ops.name == "torch" and case.runner.ops.name == "cpu"
    assert run(runner, case.prompts, max_num_batched_tokens=20)[0] == case.expected


def test_float16_kv_cache_stays_close_to_hf(case):
    """--kv-cache-dtype float16 on the CPU: K/V stored rounded to fp16 (~5e-4 relative), read
    back as fp32. Not bit-exact (a near tie late in a sequence can flip, as it does in vLLM
    with a 16-bit cache), but a broken conversion would derail every prompt at once: every
    prompt agrees with HF for its first 12 tokens and most agree for all 32."""
    runner = ModelRunner(
        RunnerConfig(
            model=case.runner.config.model,
            block_size=BLOCK_SIZE,
            num_kv_blocks=128,
            kv_cache_dtype="float16",
            quantization="none",
        )
    )
    assert runner.kv_caches[0].dtype == torch.float16
    assert runner.kv_spec.bytes_per_block * 2 == case.runner.kv_spec.bytes_per_block
    outputs, _ = run(runner, case.prompts, max_num_batched_tokens=20)
    assert all(got[:12] == want[:12] for got, want in zip(outputs, case.expected))
    assert sum(got == want for got, want in zip(outputs, case.expected)) >= 6


def test_unknown_kv_cache_dtype_is_refused(case):
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp4' is not supported"):
        ModelRunner(RunnerConfig(model=case.runner.config.model, num_kv_blocks=8, kv_cache_dtype="fp4"))
