"""CPU graphs: record the C++ kernel calls of a forward once, replay them with one call.

A decode step of one sequence runs ~300 small kernels; from Python each costs a module call,
a few checks, a ``torch.empty`` and a ctypes call, more time than the kernels themselves at
small batches (SmolLM2 q4 at batch 1: ~10 ms a step eagerly, ~4.6 ms replayed). ``record(fn)``
runs ``fn`` once while every call into the kernel library is written down with its arguments
(pointers included) and every tensor the forward allocates is noted; ``CpuGraph.replay()``
then makes the same calls from C++ (csrc/graph.cpp), in order, with nothing in between.

Memory: the tensors the forward allocated are laid out in one arena, each at an offset that
no tensor alive at the same time shares (a lifetime is the span of calls that touch it), and
the recorded pointers are moved into it by ``bind``. Graphs that never run at the same time
(a replay's output is read before the next one) can share one arena. As with a CUDA graph,
inputs are written into the recorded input tensors and the output read from ``graph.output``.

A forward can be recorded only if all of its arithmetic happens in recordable kernels
(csrc/graph.cpp's kRecordable): a torch op that computes (rather than allocating, viewing, or
reading a value for a Python-side check) would not be replayed, so recording refuses it with
``GraphUnsupported`` naming the op, as it does a library call that cannot be recorded.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import threading
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from zeroserve.kernels.cpu import build

__all__ = ["CpuGraph", "GraphUnsupported", "record"]

_lib = build.load()

_layout = (ctypes.c_int64 * 3)()
_lib.zs_graph_layout(ctypes.addressof(_layout))
OP_BYTES, INTS, FLOATS = _layout
ALIGN = 64  # bytes: every tensor in the arena starts on a cache line


class _Op(ctypes.Structure):
    _fields_ = [("thunk", ctypes.c_void_p), ("i", ctypes.c_int64 * INTS), ("f", ctypes.c_double * FLOATS)]


if ctypes.sizeof(_Op) != OP_BYTES:  # pragma: no cover (a build that disagrees with this file)
    raise build.CpuKernelsUnavailable(f"graph op layout: C++ {OP_BYTES} bytes, Python {ctypes.sizeof(_Op)}")

_FLOATS = (ctypes.c_float, ctypes.c_double)
# torch ops a recorded forward may run besides views: allocations, and reads of a value for a
# Python-side check (a bounds check before a kernel); none computes what the kernels read
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty"}
_HOST_READS = {"min", "max", "item", "_local_scalar_dense", "eq", "ne", "lt", "le", "gt", "ge", "any", "all"}


class GraphUnsupported(RuntimeError):
    """The forward cannot be recorded (the message says which op or call)."""


class _Call:
    __slots__ = ("name", "thunk", "ints", "floats", "pointers")

    def __init__(self, name: str, thunk: int, ints: list[int], floats: list[float], pointers: list[int]):
        self.name, self.thunk, self.ints, self.floats = name, thunk, ints, floats
        self.pointers = pointers  # indices into ints that are pointers


class CpuGraph:
    """Recorded calls with the forward's own tensors planned into an arena; ``bind`` places
    them in one (then ``replay`` runs and ``output`` is the forward's result)."""

    def __init__(self, calls: list[_Call], places: dict[int, tuple[int, int]], size: int, out, external):
        self._calls, self._places, self.arena_bytes = calls, places, size
        self._starts = sorted(places)
        self._sizes = {start: nbytes for start, (_, nbytes) in places.items()}
        self._out_template = out
        self._external = external  # views of memory the forward did not allocate (kept alive)
        self._ops: ctypes.Array | None = None
        self._run: Callable[[], None] | None = None
        self.arena: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._calls]

    def bind(self, arena: torch.Tensor | None = None) -> None:
        """Point the calls into ``arena`` (uint8, at least ``arena_bytes``; a new one if None)."""
        if arena is None:
            arena = torch.empty(max(self.arena_bytes, 1), dtype=torch.uint8)
        if arena.dtype != torch.uint8 or not arena.is_contiguous() or arena.numel() < self.arena_bytes:
            raise ValueError(f"a CPU graph needs a contiguous uint8 arena of {self.arena_bytes} bytes")
        base = arena.data_ptr()
        ops = (_Op * len(self._calls))()
        for op, call in zip(ops, self._calls, strict=True):
            ints = list(call.ints)
            for k in call.pointers:
                moved = self._offset(ints[k])
                if moved is not None:
                    ints[k] = base + moved
            op.thunk = call.thunk
            op.i[: len(ints)] = ints
            op.f[: len(call.floats)] = call.floats
        self.arena, self._ops = arena, ops
        self._run = functools.partial(_lib.zs_graph_run, ctypes.addressof(ops), len(ops))
        self.output = self._out_view(arena)

    def _out_view(self, arena: torch.Tensor) -> torch.Tensor | None:
        out = self._out_template
        if out is None:
            return None
        moved = self._offset(out.untyped_storage().data_ptr())
        if moved is None:
            return out  # memory the forward did not allocate: kept as it is
        elem = out.element_size()  # (arena offsets are multiples of ALIGN, so of elem)
        view = torch.empty(0, dtype=out.dtype)
        return view.set_(
            arena.untyped_storage(), moved // elem + out.storage_offset(), out.shape, out.stride()
        )

    def _offset(self, ptr: int) -> int | None:
        """The arena offset of ``ptr`` if it points into one of the recorded allocations."""
        start = _owner(ptr, self._starts, self._sizes)
        return None if start is None else self._places[start][0] + (ptr - start)

    def replay(self) -> None:
        if self._run is None:
            raise RuntimeError("replay of a CPU graph that is not bound to an arena (call bind first)")
        self._run()


def _owner(ptr: int, starts: list[int], nbytes: dict[int, int]) -> int | None:
    """The start of the allocation (``starts`` sorted, sizes in ``nbytes``) ``ptr`` points into."""
    i = bisect.bisect_right(starts, ptr) - 1
    return starts[i] if i >= 0 and ptr < starts[i] + nbytes[starts[i]] else None


class _Watch(TorchDispatchMode):
    """Notes the tensors a torch op allocates, keeps every tensor made (views of memory
    made elsewhere must stay alive), and notes the ops that compute."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: list[torch.Tensor] = []
        self.allocated: dict[int, int] = {}  # storage address -> bytes
        self.computing: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.keep.extend(outs)
        name = func.overloadpacket.__name__
        if name in _ALLOCATIONS:
            for t in outs:
                self.allocated[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        elif name not in _HOST_READS:
            inputs = {
                t.untyped_storage().data_ptr()
                for t in pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            if name.endswith("_") or any(t.untyped_storage().data_ptr() not in inputs for t in outs):
                self.computing.add(str(func))
        return out


def _plan(calls: list[_Call], allocated: dict[int, int], out_start: int | None) -> tuple[dict, int]:
    """Arena offsets {allocation address: (offset, bytes)} and the arena's size: allocations
    whose lifetimes (first..last call touching them; the output's lasts to the end) overlap
    never share bytes. Allocations no call touches get no place."""
    starts = sorted(allocated)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for n, call in enumerate(calls):
        for k in call.pointers:
            start = _owner(call.ints[k], starts, allocated)
            if start is not None:
                first.setdefault(start, n)
                last[start] = n
    if out_start is not None and out_start in first:
        last[out_start] = len(calls)
    places: dict[int, tuple[int, int]] = {}
    size = 0
    for start in sorted(first, key=lambda s: -allocated[s]):  # largest first: first-fit packs well
        nbytes = -(-allocated[start] // ALIGN) * ALIGN
        busy = sorted(
            (places[o][0], places[o][0] + -(-places[o][1] // ALIGN) * ALIGN)
            for o in places
            if first[o] <= last[start] and first[start] <= last[o]
        )
        offset = 0
        for lo, hi in busy:
            if offset + nbytes <= lo:
                break
            offset = max(offset, hi)
        places[start] = (offset, allocated[start])
        size = max(size, offset + nbytes)
    return places, size


def record(
    fn: Callable[[], torch.Tensor | None], *, bind: bool = True
) -> tuple[CpuGraph, torch.Tensor | None]:
    """Run ``fn()`` once, recording it; returns (graph, what fn returned). The graph is bound
    to an arena of its own unless ``bind`` is False. Raises GraphUnsupported when fn computes
    outside the recordable kernels."""
    noted: list[tuple[object, tuple]] = []
    me = threading.get_ident()

    def note(result, func, args):
        if threading.get_ident() == me:  # (another thread's kernel call is not this forward's)
            noted.append((func, args))
        return result

    funcs = [v for k, v in vars(_lib).items() if k.startswith("zs_") and isinstance(v, ctypes._CFuncPtr)]
    for f in funcs:  # (every function Python has called so far: CDLL caches each on first use)
        f.errcheck = note
    watch = _Watch()
    try:
        with watch:
            out = fn()
    finally:
        for f in funcs:
            del f.errcheck  # back to none (assigning None is refused)
    if watch.computing:
        raise GraphUnsupported(
            f"the forward computes in torch ops the graph cannot replay: {', '.join(sorted(watch.computing))}"
        )
    if out is not None and not isinstance(out, torch.Tensor):
        raise GraphUnsupported(f"the forward returns {type(out).__name__}, not a tensor")
    calls = []
    for func, args in noted:
        thunk = _lib.zs_graph_thunk(func.__name__.encode())
        if not thunk:
            raise GraphUnsupported(f"{func.__name__} cannot be recorded")
        ints, floats, pointers = [], [], []
        for value, argtype in zip(args, func.argtypes, strict=True):
            value = getattr(value, "value", value)  # a ctypes object: its Python value
            if issubclass(argtype, _FLOATS):
                floats.append(float(value))
                continue
            if argtype is ctypes.c_void_p:
                pointers.append(len(ints))
            ints.append(0 if value is None else int(value))
        if len(ints) > INTS or len(floats) > FLOATS:
            raise GraphUnsupported(f"{func.__name__} takes more arguments than a graph op holds")
        calls.append(_Call(func.__name__, thunk, ints, floats, pointers))
    out_start = None if out is None else out.untyped_storage().data_ptr()
    places, size = _plan(calls, watch.allocated, out_start)
    external = [t for t in watch.keep if t.untyped_storage().data_ptr() not in watch.allocated]
    graph = CpuGraph(calls, places, size, out, external)
    if bind:
        graph.bind()
    return graph, out
