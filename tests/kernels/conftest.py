"""Triton kernels under tests/kernels run in the CPU interpreter.

Triton decides "interpreter or GPU" when code is *decorated*, i.e. when a module is imported,
not at launch: ``@triton.jit`` builds an InterpretedFunction instead of a JITFunction if
TRITON_INTERPRET is set at that moment, and that includes Triton's own library of jit
functions (``tl.max``, ``tl.cdiv`` in triton/language/standard.py, imported with ``triton``)
and gluon's copies of them (imported lazily at the first launch, which asserts the same
mode). So this file, which pytest imports before the test modules of this directory:

1. sets TRITON_INTERPRET=1;
2. re-imports Triton's Python modules if Triton was already imported in GPU mode earlier in
   the session (its C extension stays), plus gluon, and every zeroserve.kernels.triton module;
3. restores the environment, so that subprocesses started by other tests (servers, GPU
   workers on a GPU CI) and test_compile_targets.py's compiler runs do not inherit it.

After that nothing in Triton's launch path reads the variable again.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _drop(prefix: str, keep: str | None = None) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        if keep is None or not name.startswith(keep):
            del sys.modules[name]


def _interpreting(triton) -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.3; older ones read os.environ
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def _import_kernels_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    # imported in GPU mode by an earlier test module? (knobs read the environment live, so ask
    # before setting it)
    gpu_mode_triton = "triton" in sys.modules and not _interpreting(sys.modules["triton"])
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if gpu_mode_triton:
            _drop("triton", keep="triton._C")
        _drop("zeroserve.kernels.triton")
        importlib.import_module("triton")
        try:
            importlib.import_module("triton.experimental.gluon")
        except ImportError:  # Triton versions without gluon
            pass
        package = importlib.import_module("zeroserve.kernels.triton")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"zeroserve.kernels.triton.{module.name}")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_kernels_interpreted()


def pytest_collection_modifyitems(config, items):
    # The interpreter turns 0-d loop bounds into Python ints through numpy's deprecated path;
    # that is Triton's business, not a finding of these tests.
    import pytest

    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(
                pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
            )
