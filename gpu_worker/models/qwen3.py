"""Qwen3 (dense): Llama wiring plus an RMSNorm over each head's query and key vectors
(``q_norm`` / ``k_norm``, weight [D]) before rotary; no qkv bias unless the config says so."""

from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
