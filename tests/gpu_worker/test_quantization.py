"""The --quantization rule (gpu_worker/quantization.py) on made-up machines and checkpoints, and
the mode reaching the kernel backend, the loader and the ready log of a real ModelRunner."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

from zeroserve.gpu_worker.model_runner import ModelRunner, RunnerConfig
from zeroserve.gpu_worker.quantization import (
    CheckpointFacts,
    available_modes,
    cpu_flags,
    resolve_quantization,
)
from zeroserve.kernels.quantized import QUANTIZATIONS

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})
SAPPHIRE = VNNI | {"avx512_bf16", "amx_bf16"}
OLD = frozenset({"avx2", "fma"})
Q4_GGUF = CheckpointFacts("gguf", Counter({"Q4_1": 210, "Q8_0": 1}), "m.gguf")
K_GGUF = CheckpointFacts("gguf", Counter({"Q4_K": 150, "Q6_K": 31, "F32": 0}), "k.gguf")
F16_GGUF = CheckpointFacts("gguf", Counter({"F16": 211}), "f16.gguf")
HF = CheckpointFacts("hf", path="/models/hf")
DUMMY = CheckpointFacts("dummy", path="m.gguf")


def resolve(requested="auto", dtype="auto", device=CPU, facts=Q4_GGUF, flags=VNNI, **kw):
    return resolve_quantization(requested, dtype, device, facts, flags, **kw)


@pytest.mark.parametrize(
    "facts, flags, mode, why",
    [
        (Q4_GGUF, VNNI, "q4", "auto: GGUF Q4_1 blocks, avx512_vnni"),
        (HF, VNNI, "int8", "auto: float weights, avx512_vnni"),
        (F16_GGUF, VNNI, "int8", "auto: float weights"),
        (DUMMY, VNNI, "int8", "float weights"),  # random weights are float whatever the file holds
        (Q4_GGUF, OLD, "none", "no avx512_vnni"),
        (HF, frozenset(), "none", "no avx512_vnni"),
    ],
)
def test_auto_on_cpu_is_the_fastest_mode_the_machine_and_checkpoint_allow(facts, flags, mode, why):
    choice = resolve(facts=facts, flags=flags)
    assert (choice.mode, choice.dtype) == (mode, torch.float32)
    assert why in choice.reason


def test_auto_leaves_q4_for_int8_when_the_kernels_lack_the_checkpoints_block_type():
    choice = resolve(facts=K_GGUF, kernel_types=frozenset({"Q4_0", "Q4_1", "Q8_0"}))
    assert choice.mode == "int8" and "no q4 kernel for GGUF Q4_K" in choice.reason
    assert resolve(facts=K_GGUF, kernel_types=frozenset({"Q4_K", "Q6_K"})).mode == "q4"


def test_auto_picks_only_modes_whose_kernels_exist():
    assert resolve(facts=HF, available=frozenset({"none", "q4"})).mode == "none"
    assert resolve(facts=Q4_GGUF, available=frozenset({"none", "int8"})).mode == "int8"


def test_dtype_bfloat16_on_cpu_is_bf16_weights_where_the_cpu_has_bf16_units():
    choice = resolve(dtype="bfloat16", flags=SAPPHIRE)
    assert (choice.mode, choice.dtype, choice.warning) == ("bf16", torch.float32, None)
    assert "avx512_bf16" in choice.reason
    old = resolve(dtype="bfloat16", flags=VNNI)
    assert (old.mode, old.dtype) == ("none", torch.float32)  # fp32: bf16 would be slower
    assert "neither avx512_bf16 nor amx_bf16" in old.reason and old.warning
    assert resolve("none", dtype="bfloat16", flags=SAPPHIRE).mode == "bf16"


def test_none_keeps_the_requested_dtype():
    assert resolve("none", dtype="float32").dtype == torch.float32
    assert resolve("none", dtype="float16").dtype == torch.float16
    assert (resolve("none", facts=Q4_GGUF).mode, resolve("none").reason) == ("none", "requested")


@pytest.mark.parametrize(
    "requested, kw, message",
    [
        ("fp8", {}, "fp8 needs an NVIDIA GPU of compute capability 8.9"),
        ("q4", {"facts": HF}, "q4 serves a GGUF file's own"),
        ("q4", {"facts": F16_GGUF}, "a GGUF file of float weights"),
        ("q4", {"facts": DUMMY}, "random float weights"),
        ("int8", {"dtype": "bfloat16"}, "drop --dtype bfloat16"),
        ("fp8", {"device": CUDA, "cuda_capability": (8, 0)}, "this one is sm_80"),
        ("int8", {"device": CUDA, "cuda_capability": (9, 0)}, "int8 is a CPU mode"),
        ("q4", {"device": CUDA, "cuda_capability": (9, 0)}, "q4 is a CPU mode"),
        ("int4", {}, "not a mode"),
    ],
)
def test_what_cannot_be_served_is_a_clear_error(requested, kw, message):
    with pytest.raises(ValueError, match=message):
        resolve(requested, **kw)


def test_gpu_modes():
    auto = resolve(device=CUDA, cuda_capability=(9, 0))
    assert (auto.mode, auto.dtype) == ("none", torch.bfloat16)
    fp8 = resolve("fp8", device=CUDA, cuda_capability=(8, 9))
    assert fp8.mode == "fp8" and "sm_89" in fp8.reason


def test_explicit_int8_without_vnni_is_served_and_says_so():
    choice = resolve("int8", flags=OLD)
    assert choice.mode == "int8" and "no avx512_vnni" in choice.reason


def test_engine_args_choices_are_the_kernels_modes():
    from zeroserve.launcher import engine_args

    assert engine_args.QUANTIZATIONS == QUANTIZATIONS
    flag = next(f for group in engine_args.FLAGS.values() for f in group if f.field == "quantization")
    assert flag.choices == QUANTIZATIONS
    for mode in ("none", "int8", "q4", "fp8", "auto"):
        assert f"{mode}:" in flag.help  # the help says what each mode is


# --------------------------------------------------------------------------- a real runner

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}


@pytest.fixture
def model_dir(tmp_path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path)


def runner(model_dir, **kw) -> ModelRunner:
    return ModelRunner(RunnerConfig(model=model_dir, load_format="dummy", num_kv_blocks=8, **kw))


def test_the_runner_resolves_the_mode_once_and_passes_it_to_the_kernels(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="zeroserve.gpu_worker.model_runner"):
        none = runner(model_dir, quantization="none")
    assert none.quantization == none.ops.quantization == "none"
    assert "quantization none (requested): float32 x9 on " in none.quantization_summary  # 2 x 4 + lm_head
    assert none.quantization_summary in caplog.text  # the ready line says it
    auto = runner(model_dir)  # dummy weights are float: int8 where VNNI and the int8 kernels are
    vnni = "avx512_vnni" in cpu_flags() and "int8" in available_modes(auto.ops.name)
    assert auto.quantization == auto.ops.quantization == ("int8" if vnni else "none")
    with pytest.raises(ValueError, match="q4 serves a GGUF file's own"):
        runner(model_dir, quantization="q4")
    with pytest.raises(ValueError, match="fp8 needs an NVIDIA GPU"):
        runner(model_dir, quantization="fp8")


def test_dtype_bfloat16_on_cpu_follows_the_cpus_bf16_units(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        r = runner(model_dir, dtype="bfloat16", quantization="none")
    assert r.dtype == torch.float32  # activations stay fp32 either way
    if any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16")) and r.quantization == "bf16":
        assert r.ops.quantization == "bf16"
    else:
        assert r.quantization == "none" and "--dtype bfloat16 ignored" in caplog.text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantization", "fp8", "--device", "cpu"], "fp8 needs an NVIDIA GPU"),
        (["--quantization", "q4", "--device", "cpu"], "q4 serves a GGUF file's own"),
        (["--quantization", "int8", "--device", "cuda"], "int8 is a CPU mode"),
        (["--quantization", "int8", "--dtype", "bfloat16", "--device", "cpu"], "drop --dtype bfloat16"),
    ],
)
def test_the_command_line_refuses_what_no_such_machine_serves(model_dir, tmp_path, flags, message):
    """Before any process starts: a worker would only fail at start, and be restarted."""
    from zeroserve.launcher.engine_args import config_from_args
    from zeroserve.launcher.readme_flags import serve_parser

    args = serve_parser().parse_args([model_dir, "--run-dir", str(tmp_path / "run"), *flags])
    with pytest.raises(SystemExit, match=message):
        config_from_args(args)
    args = serve_parser().parse_args(
        [model_dir, "--run-dir", str(tmp_path / "run"), "--quantization", "int8"]
    )
    assert config_from_args(args).quantization == "int8"  # what the worker resolves stays its own
