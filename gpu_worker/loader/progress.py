"""Progress bars for loading: tqdm on stderr for large checkpoints, nothing for small ones."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

AUTO_THRESHOLD_BYTES = 512 << 20  # below this a load takes a few seconds: no bar


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total_bytes: int, enabled: bool | None, desc: str) -> Iterator[Any]:
    """A byte-counting bar; enabled=None shows it only for checkpoints over 512 MiB."""
    if enabled is None:
        enabled = total_bytes >= AUTO_THRESHOLD_BYTES
    if not enabled:
        yield _NoBar()
        return
    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
        yield bar
