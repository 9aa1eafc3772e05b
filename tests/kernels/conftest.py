"""Triton kernels under tests/kernels run in the CPU interpreter.

``@triton.jit`` reads TRITON_INTERPRET when a kernel module is *imported* (it then builds an
InterpretedFunction instead of a JITFunction), so the variable is set here, before pytest
imports any test module of this directory, and any Triton kernel module imported earlier in
the session (by another package's tests) is dropped so that it is decorated again.
test_compile_targets.py compiles for real GPUs in a subprocess without this variable.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

for _name in [m for m in sys.modules if m.startswith("zeroserve.kernels.triton")]:
    del sys.modules[_name]


def pytest_collection_modifyitems(config, items):
    # The interpreter turns 0-d loop bounds into Python ints through numpy's deprecated path;
    # that is Triton's business, not a finding of these tests.
    import pytest

    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"))
