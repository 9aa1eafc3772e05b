"""What attention needs to know about a flat batch of tokens from many sequences.

A step's tokens are laid out flat, sequence after sequence::

    tokens:           | s0: 5 new (prefill) | s1: 1 (decode) | s2: 3 (chunk) |
    query_start_loc:  0                     5                6               9
    seq_lens:         [5, 40, 19]   # context length AFTER this step, cached prefix included
    block_tables:     [S, max_blocks] int32, row s lists the KV blocks of sequence s (0-padded)

Query token i of sequence s sits at position ``seq_lens[s] - q_len[s] + i`` and attends to
positions ``0 .. that position`` (causal), all of which are in the paged KV cache by the time
attention runs (new K/V are written first, through the slot mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [S+1] int32, on device
    seq_lens: torch.Tensor  # [S] int32, on device
    block_tables: torch.Tensor  # [S, max_blocks] int32, on device
    slot_mapping: torch.Tensor  # [T] int64, on device; -1 = padding token, write nothing
    max_query_len: int
    max_seq_len: int
    # host copies, so the torch reference can loop without device syncs
    query_lens_host: list[int]
    seq_lens_host: list[int]
    # [S] int8, host: 1 for a sequence whose one query token this step is a prompt token (a
    # prompt cached but for its last token); None when there is none. The CPU kernels attend a
    # prompt's tokens in tiles, and such a token must come out as it did in its prompt's tile
    one_token_prompts: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: list[int],
        device: torch.device | str = "cpu",
        pad_blocks_to: int | None = None,
        prompt: list[bool] | None = None,
    ) -> AttentionMetadata:
        """From host lists; block tables padded with block 0 to the longest row. ``prompt``:
        whether each sequence's query tokens are prompt tokens (default: those of more than one)."""
        width = max([len(b) for b in block_tables] + [pad_blocks_to or 1])
        table = torch.zeros((len(block_tables), width), dtype=torch.int32)
        for i, row in enumerate(block_tables):
            if row:
                table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_host=list(query_lens),
            seq_lens_host=list(seq_lens),
            one_token_prompts=_one_token_prompts(query_lens, prompt),
        )


def _one_token_prompts(query_lens: list[int], prompt: list[bool] | None) -> torch.Tensor | None:
    if prompt is None:
        return None
    flags = [p and n == 1 for p, n in zip(prompt, query_lens, strict=True)]
    return torch.tensor(flags, dtype=torch.int8) if any(flags) else None
