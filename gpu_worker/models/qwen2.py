"""Qwen2 / Qwen2.5: Llama wiring with a bias on the q/k/v projections (none on o_proj)."""

from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
