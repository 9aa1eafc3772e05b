"""Which projection format the worker runs: ``--quantization`` (and ``--dtype``) resolved once,
per machine and checkpoint, with the reason said in the worker's ready log.

    facts = CheckpointFacts.of(path, load_format)          # reads the GGUF header only
    choice = resolve_quantization("auto", "auto", torch.device("cpu"), facts, cpu_flags(), ...)
    choice.mode, choice.dtype, choice.reason               # "q4", float32, "auto: GGUF Q4_1 blocks, ..."

The rule (a pure function, unit-tested with made-up machines):

    device  requested  dtype       checkpoint              -> mode   why
    CPU     auto       auto/fp32   GGUF blocks, VNNI          q4     its own 4-bit blocks, int8 dots
    CPU     auto       auto/fp32   float weights, VNNI        int8   W8A8 on VNNI
    CPU     auto       auto/fp32   no VNNI                    none   int8 would not beat fp32 there
    CPU     auto/none  bfloat16    avx512_bf16 or amx_bf16    bf16   bf16 weights, fp32 activations
    CPU     auto/none  bfloat16    no bf16 units              none   fp32 (bf16 would be slower)
    CPU     fp8        any         any                        ValueError
    CPU     q4         any         not a block GGUF           ValueError
    CUDA    auto/none  any         any                        none
    CUDA    fp8        any         sm_89+                     fp8 (else ValueError)
    CUDA    int8/q4    any         any                        ValueError (CPU modes)

On a CPU every mode computes in float32 (activations in and out of each projection are fp32);
only the weights' format changes. ``auto`` picks only among the modes the backend has
projections for (``available_modes``), so it never lands on one that fails at the first step.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch

from zeroserve.kernels.quantized import QUANTIZATIONS

__all__ = [
    "BLOCK_TYPES",
    "CheckpointFacts",
    "QuantizationChoice",
    "available_modes",
    "check_flags",
    "cpu_flags",
    "gguf_kernel_types",
    "resolve_dtype",
    "resolve_quantization",
]

# GGUF tensor types that are not blocks: loaded as tensors in every mode
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
# block types the loader can keep packed (gguf_loader.SUPPORTED_TYPES minus the float ones)
BLOCK_TYPES = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VNNI = "avx512_vnni"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CheckpointFacts:
    """What the rule needs to know of a checkpoint, read without loading tensors."""

    format: str  # "hf" | "gguf" | "dummy" (random weights: float, whatever the file holds)
    matrix_types: Counter = field(default_factory=Counter)  # GGUF: type name -> number of 2-D tensors
    path: str = ""

    @classmethod
    def of(cls, path: str, load_format: str = "auto") -> CheckpointFacts:
        from zeroserve.gpu_worker.loader import checkpoint_format
        from zeroserve.gpu_worker.loader.gguf_file import GGUFFile

        if load_format == "dummy":
            return cls("dummy", Counter(), path)
        fmt = checkpoint_format(path)
        if fmt != "gguf":
            return cls(fmt, Counter(), path)
        with GGUFFile(path) as g:
            types = Counter(t.type_name for t in g.tensors.values() if len(t.ne) == 2)
        return cls("gguf", types, path)

    @property
    def block_types(self) -> Counter:
        """The block-quantized matrix types, most tensors first."""
        return Counter({t: n for t, n in self.matrix_types.items() if t in BLOCK_TYPES})

    @property
    def main_block_type(self) -> str | None:
        common = self.block_types.most_common(1)
        return common[0][0] if common else None

    def describe(self) -> str:
        if self.format == "dummy":
            return "random float weights (--load-format dummy)"
        if self.format == "hf":
            return "a Hugging Face folder (float weights)"
        if self.block_types:
            return "a GGUF file of " + ", ".join(f"{t} x{n}" for t, n in self.block_types.most_common())
        return "a GGUF file of float weights (" + ", ".join(sorted(self.matrix_types)) + ")"


@dataclass(frozen=True)
class QuantizationChoice:
    mode: str  # "none" | "int8" | "q4" | "fp8" | "bf16"
    dtype: torch.dtype  # what the loader casts float tensors to (the compute dtype)
    reason: str  # said in the ready log: "auto: GGUF Q4_1 blocks, avx512_vnni"
    warning: str | None = None  # something the user asked for and did not get


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags line of /proc/cpuinfo (empty where there is none: not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def gguf_kernel_types(backend: str) -> frozenset[str] | None:
    """GGUF block types ``backend`` multiplies from their blocks (by name); None: every type
    (the torch backend, whose reference dequantizes any block type at prepare time)."""
    if backend != "cpu":
        return None
    from gguf.constants import GGMLQuantizationType

    from zeroserve.kernels.cpu.gguf import GGUF_KERNEL_TYPES

    return frozenset(GGMLQuantizationType(t).name for t in GGUF_KERNEL_TYPES)


def available_modes(backend: str) -> frozenset[str]:
    """The modes ``backend`` has projections for (``auto`` picks only among these): fp8 is
    the Triton backend's, bf16 (fp32 activations) the CPU ones'."""
    return frozenset({"none", "q4", "int8", "fp8" if backend == "triton" else "bf16"})


def resolve_quantization(
    requested: str,
    dtype: str,
    device: torch.device,
    checkpoint: CheckpointFacts,
    flags: frozenset[str] = frozenset(),
    available: frozenset[str] = frozenset({"none", "int8", "q4", "bf16", "fp8"}),
    kernel_types: frozenset[str] | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> QuantizationChoice:
    """The mode for ``--quantization requested --dtype dtype`` on ``device`` (see the table in
    the module docstring). ``kernel_types``: the block types with a q4 kernel (None: all);
    raises ValueError for a combination that cannot be served."""
    if requested not in QUANTIZATIONS:
        raise ValueError(
            f"--quantization {requested!r} is not a mode; choose one of {', '.join(QUANTIZATIONS)}"
        )
    if device.type == "cuda":
        return _resolve_cuda(requested, resolve_dtype(dtype, device), cuda_capability)
    if requested == "fp8":
        raise ValueError(
            "--quantization fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"on {device.type} use int8 or q4"
        )
    fp32 = torch.float32
    if dtype in ("bfloat16", "float16"):
        if requested not in ("auto", "none"):
            raise ValueError(
                f"--quantization {requested} computes in float32 on a CPU and chooses the weights' format "
                f"itself: drop --dtype {dtype}, or use --quantization none"
            )
        if dtype == "float16":
            return QuantizationChoice("none", torch.float16, "--dtype float16")
        has = [f for f in BF16_FLAGS if f in flags]
        if not has:
            why = "this CPU has neither avx512_bf16 nor amx_bf16, so bf16 matmuls would be slower than fp32"
            return QuantizationChoice("none", fp32, f"--dtype bfloat16 ignored: {why}", warning=why)
        if "bf16" not in available:
            why = "the bf16 CPU kernels are not in this build"
            return QuantizationChoice("none", fp32, f"--dtype bfloat16 ignored: {why}", warning=why)
        return QuantizationChoice("bf16", fp32, f"--dtype bfloat16 on a CPU with {has[0]}: fp32 activations")
    if requested == "none":
        return QuantizationChoice("none", resolve_dtype(dtype, device), "requested")
    vnni = VNNI in flags
    if requested == "int8":
        return QuantizationChoice(
            "int8", fp32, "requested" + ("" if vnni else f" (no {VNNI}: slower int8 dots)")
        )
    main = checkpoint.main_block_type
    if requested == "q4":
        if main is None:
            raise ValueError(
                f"--quantization q4 serves a GGUF file's own 4-bit/8-bit blocks, but {checkpoint.path or 'the model'} "
                f"is {checkpoint.describe()}; use --quantization int8 (or a block-quantized GGUF)"
            )
        return QuantizationChoice("q4", fp32, f"requested: {checkpoint.describe()}")
    # auto
    if not vnni:
        return QuantizationChoice(
            "none", fp32, f"auto: this CPU has no {VNNI}, so int8 and 4-bit dots would not beat fp32"
        )
    if main is not None and "q4" in available and (kernel_types is None or main in kernel_types):
        return QuantizationChoice("q4", fp32, f"auto: GGUF {main} blocks, {VNNI}")
    if "int8" in available:
        what = f"no q4 kernel for GGUF {main}" if main is not None else "float weights"
        return QuantizationChoice("int8", fp32, f"auto: {what}, {VNNI}")
    return QuantizationChoice("none", fp32, "auto: no quantized kernels for this checkpoint in this build")


def check_flags(requested: str, dtype: str, device: str, checkpoint: CheckpointFacts) -> None:
    """Raise the ValueError the worker would for a combination no machine of this device type
    serves (fp8 on a CPU, q4 on a float checkpoint, int8 on a GPU), so that the command line
    refuses it before any process starts. What depends on the machine (VNNI, bf16 units, the
    GPU's compute capability) is left to the worker, which may run elsewhere (deploy)."""
    device_type = torch.device(device).type
    newest_gpu = (99, 0) if device_type == "cuda" else None
    resolve_quantization(requested, dtype, torch.device(device_type), checkpoint, cuda_capability=newest_gpu)


def _resolve_cuda(
    requested: str, dtype: torch.dtype, capability: tuple[int, int] | None
) -> QuantizationChoice:
    if requested in ("auto", "none"):
        return QuantizationChoice("none", dtype, "auto: none on GPU" if requested == "auto" else "requested")
    if requested == "fp8":
        if capability is None or tuple(capability) < (8, 9):
            sm = "unknown" if capability is None else f"sm_{capability[0]}{capability[1]}"
            raise ValueError(
                f"--quantization fp8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                f"this one is {sm}: use --quantization none"
            )
        return QuantizationChoice("fp8", dtype, f"requested, sm_{capability[0]}{capability[1]}")
    raise ValueError(
        f"--quantization {requested} is a CPU mode (fp32 activations); on a GPU use fp8 (sm_89+) or none"
    )
