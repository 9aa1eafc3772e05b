"""Quantized weights as the loader hands them to ``KernelBackend.prepare_linear``.

A GGUF checkpoint's weights are already quantized in blocks (Q4_0, Q4_1, Q4_K, Q8_0, ...).
With ``--quantization q4`` the loader keeps them as the file stores them, in a
:class:`GGUFWeight` (no fp32 copy), and the backends that have a kernel for the block type
multiply against them directly. Every row of a GGUF weight ``[N, K]`` is ``K / block`` blocks
laid end to end, so rows can be concatenated (q|k|v, gate|up) and permuted (llama's q/k
heads) as bytes without touching the values.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["QUANTIZATIONS", "GGUFWeight"]

# --quantization: "none" keeps the checkpoint's values in --dtype (fp32: bit-exact with
# transformers); "int8": per-output-channel int8 weights x per-token int8 activations; "q4":
# the GGUF file's own 4-bit (and 8-bit) blocks; "fp8": W8A8 e4m3 on sm_89+ GPUs; "auto": the
# fastest of these that passes the quality bar on this machine and checkpoint.
QUANTIZATIONS = ("auto", "none", "int8", "q4", "fp8")


class GGUFWeight:
    """A GGUF block-quantized weight ``[N, K]``: ``data`` is uint8 ``[N, row_bytes]``, each
    row ``K / block_size`` blocks of ``type_size`` bytes of ggml type ``ggml_type``."""

    __slots__ = ("data", "ggml_type", "shape")

    def __init__(self, data: torch.Tensor, ggml_type: int, shape: tuple[int, int]):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n, k = shape
        if k % block:
            raise ValueError(f"a {qtype.name} row of {k} values is not a whole number of {block}-blocks")
        if data.dtype != torch.uint8 or tuple(data.shape) != (n, k // block * type_size):
            raise ValueError(
                f"{qtype.name} data of shape {tuple(data.shape)} ({data.dtype}) does not hold [{n}, {k}] "
                f"(expected uint8 [{n}, {k // block * type_size}])"
            )
        self.data, self.ggml_type, self.shape = data, int(ggml_type), (int(n), int(k))

    @property
    def type_name(self) -> str:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(self.ggml_type).name

    @property
    def block_size(self) -> int:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        return GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)][0]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 ``[N, K]`` (or only ``rows``, int64 indices): exactly the values the file holds."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        data = self.data if rows is None else self.data.index_select(0, rows.to(torch.int64).cpu())
        out = dequantize(data.cpu().numpy(), GGMLQuantizationType(self.ggml_type))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1, self.shape[1])

    def permute_rows(self, order: torch.Tensor | np.ndarray) -> GGUFWeight:
        """Rows taken in ``order`` (a permutation of range(N))."""
        order = torch.as_tensor(np.asarray(order), dtype=torch.int64)
        return GGUFWeight(self.data.index_select(0, order).contiguous(), self.ggml_type, self.shape)

    @staticmethod
    def cat(parts: list[GGUFWeight]) -> GGUFWeight:
        """Rows of ``parts`` one after another (they must share the type and K)."""
        first = parts[0]
        for p in parts[1:]:
            if p.ggml_type != first.ggml_type or p.shape[1] != first.shape[1]:
                raise ValueError(
                    f"cannot stack a {p.type_name} [{p.shape[0]}, {p.shape[1]}] weight under a "
                    f"{first.type_name} [{first.shape[0]}, {first.shape[1]}] one"
                )
        data = torch.cat([p.data for p in parts], dim=0)
        return GGUFWeight(data, first.ggml_type, (int(data.shape[0]), first.shape[1]))

    def to(self, device: torch.device | str) -> GGUFWeight:
        return GGUFWeight(self.data.to(device), self.ggml_type, self.shape)

    def __repr__(self) -> str:
        return f"GGUFWeight({self.type_name}, [{self.shape[0]}, {self.shape[1]}])"
