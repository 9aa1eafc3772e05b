"""ModelRunner: plan checking, per-request state, what a step returns, KV cache sizing.

A tiny random Llama (config.json only, --load-format dummy) is enough: nothing here compares
against another implementation (test_models_hf.py does that).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)

from zeroserve.gpu_worker.input_batch import PlanError  # noqa: E402
from zeroserve.gpu_worker.kv_cache import GiB, KVCacheSpec, cpu_num_blocks  # noqa: E402
from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.launcher.inprocess import InProcessEngine  # noqa: E402
from zeroserve.shared.messages import (  # noqa: E402
    NewRequestData,
    RunningRequestData,
    SamplingParams,
    StepPlan,
    TokenLogprobs,
)

BLOCK = 4
NUM_BLOCKS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    import json

    folder = tmp_path_factory.mktemp("tiny_llama")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return str(folder)


@pytest.fixture
def runner(model_dir) -> ModelRunner:
    return ModelRunner(  # fp32 projections: the tests below look at their handles and exact values
        RunnerConfig(
            model=model_dir,
            load_format="dummy",
            block_size=BLOCK,
            num_kv_blocks=NUM_BLOCKS,
            quantization="none",
        )
    )


def new(
    rid: str,
    tokens: list[int],
    blocks: list[int],
    computed: int = 0,
    num_new: int | None = None,
    params: SamplingParams = GREEDY,
) -> NewRequestData:
    return NewRequestData(
        rid, tokens, blocks, computed, len(tokens) - computed if num_new is None else num_new, params
    )


def test_runner_reports_its_shape(runner):
    assert runner.num_kv_blocks == NUM_BLOCKS and runner.block_size == BLOCK
    assert runner.max_model_len == 64 and runner.vocab_size == 128 and runner.eos_token_ids == [2]
    assert (
        runner.kv_caches[0].shape == (2, NUM_BLOCKS, BLOCK, 2, 8)
        and runner.kv_caches[0].dtype == torch.float32
    )
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"


def test_step_result_lists_sampling_requests_in_plan_order(runner):
    # "b" runs a chunk of its prompt (no sample); "a" finishes its prompt and samples
    r0 = runner.execute(StepPlan(0, new=[new("a", [5, 6, 7], [0]), new("b", [9] * 6, [1, 2], num_new=4)]))
    assert r0.request_ids == ["a"] and len(r0.sampled_token_ids) == 1 and r0.logprobs is None
    assert r0.step_time_s > 0
    r1 = runner.execute(
        StepPlan(
            1,
            new=[new("c", [3, 4], [3])],
            running=[RunningRequestData("a", [], 1), RunningRequestData("b", [], 2)],
        )
    )
    assert r1.request_ids == ["c", "a", "b"]  # new first, then running, as planned
    assert all(0 <= t < 128 for t in r1.sampled_token_ids)


def test_logprobs_only_when_asked(runner):
    asks = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2)
    r = runner.execute(StepPlan(0, new=[new("x", [1, 2, 3], [0]), new("y", [4, 5], [1], params=asks)]))
    assert r.logprobs is not None and r.logprobs[0] is None
    lp = r.logprobs[1]
    assert isinstance(lp, TokenLogprobs) and lp.logprob <= 0 and len(lp.top) == 2
    assert lp.top[0].token_id == r.sampled_token_ids[1]  # greedy: the sampled token is the top one


def test_unknown_running_request_is_a_clear_error(runner):
    runner.execute(StepPlan(0, new=[new("a", [5, 6, 7], [0])]))
    with pytest.raises(PlanError, match="'ghost'.*does not hold"):
        runner.execute(
            StepPlan(1, running=[RunningRequestData("a", [], 1), RunningRequestData("ghost", [], 1)])
        )
    # nothing was applied: "a" continues exactly as it would have
    assert runner.execute(StepPlan(2, running=[RunningRequestData("a", [], 1)])).request_ids == ["a"]


@pytest.mark.parametrize("bad_block", [NUM_BLOCKS, -1, 10**9])
def test_out_of_range_block_is_a_clear_error(runner, bad_block):
    with pytest.raises(PlanError, match=f"block id {bad_block} is out of range"):
        runner.execute(StepPlan(0, new=[new("a", [1, 2, 3, 4, 5], [0, bad_block])]))
    assert runner.num_requests == 0
    runner.execute(StepPlan(1, new=[new("b", [1, 2, 3], [0])]))
    with pytest.raises(PlanError, match="out of range"):
        runner.execute(StepPlan(2, running=[RunningRequestData("b", [bad_block], 1)]))
    # the bad block was not appended to b's table
    assert runner.requests.requests["b"].block_ids == [0]


def test_plans_that_outrun_the_state_are_rejected(runner):
    with pytest.raises(PlanError, match="knows only 3 tokens"):
        runner.execute(StepPlan(0, new=[new("a", [1, 2, 3], [0], num_new=4)]))
    with pytest.raises(PlanError, match="block table has 1"):
        runner.execute(StepPlan(0, new=[new("a", [1, 2, 3, 4, 5], [0])]))
    runner.execute(StepPlan(0, new=[new("a", [1, 2, 3], [0])]))
    with pytest.raises(PlanError, match="knows only 4 tokens"):  # prompt + 1 sampled
        runner.execute(StepPlan(1, running=[RunningRequestData("a", [], 2)]))
    with pytest.raises(PlanError, match="already holds it"):
        runner.execute(StepPlan(1, new=[new("a", [1, 2, 3], [1])]))
    with pytest.raises(PlanError, match="twice"):
        runner.execute(StepPlan(1, running=[RunningRequestData("a", [], 1), RunningRequestData("a", [], 1)]))


def test_finished_ids_free_state(runner):
    runner.execute(StepPlan(0, new=[new("a", [1, 2, 3], [0]), new("b", [4, 5], [1])]))
    assert runner.num_requests == 2
    runner.execute(StepPlan(1, running=[RunningRequestData("b", [], 1)], finished_ids=["a"]))
    assert runner.num_requests == 1 and "a" not in runner.requests
    with pytest.raises(PlanError, match="'a'"):
        runner.execute(StepPlan(2, running=[RunningRequestData("a", [], 1)]))
    # a preempted request comes back as new in the same plan that finishes it
    r = runner.execute(StepPlan(3, new=[new("b", [4, 5, 9], [2])], finished_ids=["b"]))
    assert r.request_ids == ["b"] and runner.num_requests == 1
    runner.execute(StepPlan(4, finished_ids=["b", "never-seen"]))  # unknown finished ids are ignored
    assert runner.num_requests == 0


def test_reset_forgets_every_request(runner):
    runner.execute(StepPlan(0, new=[new("a", [1, 2, 3], [0]), new("b", [4, 5], [1])]))
    runner.reset()
    assert runner.num_requests == 0
    with pytest.raises(PlanError):
        runner.execute(StepPlan(1, running=[RunningRequestData("a", [], 1)]))
    assert runner.execute(StepPlan(2, new=[new("a", [1, 2, 3], [0])])).request_ids == ["a"]


def test_seeded_sampling_depends_only_on_the_seed(runner):
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    engine = InProcessEngine(runner)
    alone = engine.generate([[7, 8, 9]], seeded)[0]
    crowd = engine.generate(
        [[1, 2], [7, 8, 9], [5] * 9],
        [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), seeded, GREEDY],
    )[1]
    assert alone == crowd and len(alone) == 12
    other_seed = engine.generate(
        [[7, 8, 9]], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)
    )[0]
    assert other_seed != alone


def test_max_model_len_beyond_the_model_is_refused(model_dir):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ModelRunner(RunnerConfig(model=model_dir, load_format="dummy", num_kv_blocks=8, max_model_len=65))


def test_small_cache_lowers_max_model_len(model_dir):
    runner = ModelRunner(
        RunnerConfig(model=model_dir, load_format="dummy", block_size=BLOCK, num_kv_blocks=4)
    )
    assert runner.max_model_len == 16


def test_cpu_cache_sizing():
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype=torch.float32)
    assert spec.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 4
    assert cpu_num_blocks(spec, 1.0, max_num_seqs=256, max_model_len=8192) == GiB // spec.bytes_per_block
    # capped at what max_num_seqs sequences of max_model_len can use
    assert cpu_num_blocks(spec, 8.0, max_num_seqs=2, max_model_len=100) == 2 * 7
    runner_default = cpu_num_blocks(spec, None, 256, 8192)
    assert runner_default * spec.bytes_per_block <= 2 * GiB < (runner_default + 1) * spec.bytes_per_block


def _run(
    runner,
    rid: str,
    prompt: list[int],
    blocks: list[int],
    steps: int,
    params: SamplingParams,
    step0: int = 0,
    resumed: list[int] = (),
    num_prompt_tokens: int = -1,
) -> list[int]:
    """Send (prompt + resumed) as new, then decode; returns the sampled tokens."""
    tokens = list(prompt) + list(resumed)
    r = runner.execute(
        StepPlan(step0, new=[NewRequestData(rid, tokens, blocks, 0, len(tokens), params, num_prompt_tokens)])
    )
    out = list(r.sampled_token_ids)
    for s in range(1, steps):
        out += runner.execute(StepPlan(step0 + s, running=[RunningRequestData(rid, [], 1)])).sampled_token_ids
    return out


def test_resumed_request_keeps_its_output_as_output(runner):
    """After a preemption the scheduler resends prompt + generated tokens as new; with
    num_prompt_tokens the worker still counts the generated ones as output, so frequency /
    presence penalties and min_tokens behave as if nothing had happened."""
    params = SamplingParams(
        max_tokens=12,
        temperature=0.0,
        frequency_penalty=1.5,
        presence_penalty=1.0,
        repetition_penalty=1.3,
        min_tokens=12,
        ignore_eos=False,
    )
    prompt = [5, 9, 5, 17, 33]
    whole = _run(runner, "a", prompt, [0, 1, 2, 3], 12, params)
    first = _run(runner, "b", prompt, [4, 5, 6, 7], 5, params, step0=20)
    rest = _run(
        runner, "c", prompt, [8, 9, 10, 11], 7, params, step0=40, resumed=first, num_prompt_tokens=len(prompt)
    )
    assert first + rest == whole
    # the test can tell: without the split the earlier tokens would count as prompt
    as_prompt = _run(runner, "d", prompt, [12, 13, 14, 15], 7, params, step0=60, resumed=first)
    assert first + as_prompt != whole


def test_bad_num_prompt_tokens_is_rejected(runner):
    with pytest.raises(PlanError, match="num_prompt_tokens=9"):
        runner.execute(StepPlan(0, new=[NewRequestData("x", [1, 2, 3], [0], 0, 3, GREEDY, 9)]))


def test_projections_are_packed_at_the_first_step(model_dir, runner):
    """The C++ kernels' panels by default, oneDNN's layout with the torch kernels; both drop
    the plain weight and give the same greedy tokens (same seeded dummy weights)."""
    from zeroserve.kernels.cpu.ops import PackedLinear
    from zeroserve.kernels.reference.backend import OneDNNLinear

    runner.execute(StepPlan(0, new=[new("a", [1, 2, 3], [0])]))
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.handle, PackedLinear) and qkv.weight is None
    torch_runner = ModelRunner(
        RunnerConfig(
            model=model_dir,
            load_format="dummy",
            block_size=BLOCK,
            num_kv_blocks=NUM_BLOCKS,
            kernel_backend="torch",
            quantization="none",
        )
    )
    qkv = torch_runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.handle is None and qkv.weight is not None  # still editable until the first step
    torch_runner.execute(StepPlan(0, new=[new("a", [1, 2, 3], [0])]))
    assert isinstance(qkv.handle, OneDNNLinear) and qkv.weight is None
    greedy = InProcessEngine(runner).generate([[5, 6, 7]], GREEDY)
    assert greedy == InProcessEngine(torch_runner).generate([[5, 6, 7]], GREEDY)
