"""CPU decode graphs in the ModelRunner (gpu_worker/cpu_graphs.py): on by default with the C++
kernels, replayed for decode-only batches (padded to a bucket), eager for anything else, and
the same tokens as the eager runner. Greedy equality with transformers through the graphs is
pinned by test_models_hf.py and test_smollm2_gguf.py, whose decode steps replay them."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig  # noqa: E402
from zeroserve.kernels.cpu import build  # noqa: E402
from zeroserve.shared.messages import NewRequestData, RunningRequestData, SamplingParams, StepPlan  # noqa: E402

if build._compiler() is None:
    pytest.skip(
        "no C++ compiler here: the CPU kernels (and their graphs) are not built", allow_module_level=True
    )
from zeroserve.gpu_worker.cpu_graphs import CpuDecodeGraphs  # noqa: E402

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=2)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama_graphs")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return str(folder)


def _runner(model_dir, **kw) -> ModelRunner:
    kw.setdefault("max_num_seqs", 8)
    return ModelRunner(
        RunnerConfig(
            model=model_dir,
            load_format="dummy",
            block_size=4,
            num_kv_blocks=160,
            kv_cache_dtype="float16",
            **kw,
        )
    )


def _generate(runner: ModelRunner, prompts: list[list[int]], steps: int):
    """Prefill all, then `steps` decode-only steps; (tokens, logprobs) per step."""
    new = [
        NewRequestData(f"r{i}", p, list(range(12 * i, 12 * i + 12)), 0, len(p), GREEDY)
        for i, p in enumerate(prompts)
    ]
    out = [runner.execute(StepPlan(0, new=new))]
    running = [RunningRequestData(f"r{i}", [], 1) for i in range(len(prompts))]
    out += [runner.execute(StepPlan(1 + s, running=running)) for s in range(steps)]
    runner.execute(StepPlan(steps + 1, finished_ids=[f"r{i}" for i in range(len(prompts))]))
    return [r.sampled_token_ids for r in out], [r.logprobs for r in out]


def test_graphs_are_recorded_by_default_and_not_with_enforce_eager(model_dir):
    runner = _runner(model_dir, max_num_seqs=12)
    assert isinstance(runner.forward, CpuDecodeGraphs)
    assert sorted(runner.forward.graphs) == list(range(1, 9))  # one per size; larger at first use
    assert runner.forward.max_batch == 12 and runner.forward.active
    assert "replay CPU graphs" in runner.graphs_summary
    assert not isinstance(_runner(model_dir, enforce_eager=True).forward, CpuDecodeGraphs)
    assert not isinstance(_runner(model_dir, kernel_backend="torch").forward, CpuDecodeGraphs)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_replayed_decodes_match_the_eager_runner(model_dir, batch):
    """One graph per exact size (a CPU pays for padding rows): batch 3 replays its own."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 256, (5 + 3 * i,), generator=gen).tolist() for i in range(batch)]
    graphs, eager = _runner(model_dir), _runner(model_dir, enforce_eager=True)
    got_tokens, got_logprobs = _generate(graphs, prompts, 12)
    want_tokens, want_logprobs = _generate(eager, prompts, 12)
    assert graphs.forward.replays == 12  # every decode step; the prefill ran eagerly
    assert got_tokens == want_tokens
    for got, want in zip(got_logprobs, want_logprobs, strict=True):
        for g, w in zip(got, want, strict=True):
            assert [t.token_id for t in g.top] == [t.token_id for t in w.top]
            got_values = [g.logprob, *(t.logprob for t in g.top)]
            want_values = [w.logprob, *(t.logprob for t in w.top)]
            torch.testing.assert_close(
                torch.tensor(got_values), torch.tensor(want_values), rtol=1e-5, atol=1e-5
            )


def test_a_larger_batch_is_recorded_at_its_first_step_and_checked_at_its_second(model_dir):
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (4 + i,), generator=gen).tolist() for i in range(11)]
    runner, eager = (
        _runner(model_dir, max_num_seqs=12),
        _runner(model_dir, enforce_eager=True, max_num_seqs=12),
    )
    graphs = runner.forward
    got, _ = _generate(runner, prompts, 6)
    want, _ = _generate(eager, prompts, 6)
    assert got == want
    assert 11 in graphs.graphs and not graphs.unchecked and graphs.active
    assert graphs.replays == 4  # step 1 recorded, step 2 checked against eager, then replayed
    assert graphs.arena.numel() >= graphs.graphs[11].arena_bytes  # the arena grew for it


def test_a_replay_that_disagrees_with_eager_turns_graphs_off(model_dir, caplog):
    """As if a recording had missed something: the check at the second step catches it, the
    step answers with the eager result, and every later step runs eagerly."""
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 256, (4 + i,), generator=gen).tolist() for i in range(10)]
    runner, eager = (
        _runner(model_dir, max_num_seqs=12),
        _runner(model_dir, enforce_eager=True, max_num_seqs=12),
    )
    graphs = runner.forward
    real_record = graphs._record

    def record_then_break(batch):
        out = real_record(batch)
        graphs.graphs[batch].replay = lambda: graphs.outputs[batch].fill_(0.5)
        return out

    graphs._record = record_then_break
    with caplog.at_level("WARNING"):
        got, _ = _generate(runner, prompts, 5)
    assert got == _generate(eager, prompts, 5)[0]
    assert not graphs.active and "differs from the eager forward" in graphs.disabled_reason
    assert "CPU graphs off" in caplog.text and graphs.replays == 0


def test_batches_past_max_batch_and_mixed_steps_run_eagerly(model_dir):
    runner = _runner(model_dir, max_num_seqs=8)
    prompts = [[5 + i, 6, 7] for i in range(9)]
    _generate(runner, prompts, 3)
    assert runner.forward.replays == 0 and 9 not in runner.forward.graphs
    # the prefill step (prompts beside no decodes) ran eagerly; the decodes of 2 replay
    _generate(runner, prompts[:2], 2)
    assert runner.forward.replays == 2


def test_a_forward_the_graph_cannot_replay_turns_graphs_off_with_the_reason(model_dir, monkeypatch, caplog):
    """A torch op in the forward (here: a fallback that scales the hidden state) is refused
    at recording; the runner logs why and decodes eagerly, with correct output."""
    from zeroserve.gpu_worker.models import llama

    real = llama.LlamaModel.forward
    monkeypatch.setattr(llama.LlamaModel, "forward", lambda self, *a: real(self, *a) * 1.0)
    with caplog.at_level("WARNING"):
        runner = _runner(model_dir)
    assert not isinstance(runner.forward, CpuDecodeGraphs)
    assert "CPU graphs off" in caplog.text and "aten.mul" in caplog.text
    tokens, _ = _generate(runner, [[5, 6, 7]], 2)
    assert len(tokens) == 3


def test_an_out_of_range_token_id_in_a_decode_step_is_an_error_not_a_wild_read(model_dir):
    """A replay indexes the embedding without the eager wrappers' checks, so the graphs check
    the step's ids first and leave a bad one to the eager path, which raises."""
    runner = _runner(model_dir)
    bad = NewRequestData("bad", [5, 6, CONFIG["vocab_size"] + 7], list(range(12)), 2, 1, GREEDY)
    with pytest.raises(IndexError):
        runner.execute(StepPlan(0, new=[bad]))
    assert runner.forward.replays == 0 and runner.forward.active
