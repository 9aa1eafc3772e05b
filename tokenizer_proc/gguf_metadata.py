"""Read the key/value metadata of a GGUF file, and nothing else.

``gguf.GGUFReader`` builds a numpy view per element of every metadata array, which costs
4-7 s for a 49k-token vocabulary on a loaded 2-core machine; the tokenizer needs only the
metadata, so this reads the header with ``struct`` and stops before the tensor infos
(~0.1 s). The value type codes are the ``gguf`` package's ``GGUFValueType``.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key | u32 value type | value)
    string = u64 byte length | utf-8 bytes
    array  = u32 element type | u64 count | count x element
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

import numpy as np
from gguf import GGUFValueType as T

from .errors import TokenizerLoadError

_MAGIC = b"GGUF"
_SCALAR = {
    T.UINT8: "<B",
    T.INT8: "<b",
    T.UINT16: "<H",
    T.INT16: "<h",
    T.UINT32: "<I",
    T.INT32: "<i",
    T.FLOAT32: "<f",
    T.BOOL: "<?",
    T.UINT64: "<Q",
    T.INT64: "<q",
    T.FLOAT64: "<d",
}
_NUMPY = {
    T.UINT8: np.uint8,
    T.INT8: np.int8,
    T.UINT16: np.uint16,
    T.INT16: np.int16,
    T.UINT32: np.uint32,
    T.INT32: np.int32,
    T.FLOAT32: np.float32,
    T.BOOL: np.bool_,
    T.UINT64: np.uint64,
    T.INT64: np.int64,
    T.FLOAT64: np.float64,
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace")


class _Cursor:
    """A read position over the mapped file; every read checks the bounds."""

    def __init__(self, buf: mmap.mmap, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise TokenizerLoadError(f"{self.path}: truncated or corrupt GGUF metadata at byte {start}")
        self.pos = start + n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self.take(8))[0]

    def string(self) -> str:
        n = self.u64()
        return _utf8(self.buf[self.take(n) : self.pos])

    def strings(self, count: int) -> list[str]:
        """An array of strings (a vocabulary: ~100k of them), in one tight loop."""
        buf, pos, end, unpack, out = self.buf, self.pos, len(self.buf), _U64.unpack_from, []
        for _ in range(count):
            if pos + 8 > end:
                break
            n = unpack(buf, pos)[0]
            pos += 8
            if pos + n > end:
                break
            out.append(_utf8(buf[pos : pos + n]))
            pos += n
        else:
            self.pos = pos
            return out
        raise TokenizerLoadError(f"{self.path}: truncated or corrupt GGUF metadata at byte {pos}")

    def value(self, vtype: int) -> Any:
        if vtype == T.STRING:
            return self.string()
        if vtype == T.ARRAY:
            etype, count = self.u32(), self.u64()
            if etype == T.STRING:
                return self.strings(count)
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype=dtype, count=count, offset=start).tolist()
            return [self.value(etype) for _ in range(count)]
        fmt = _SCALAR.get(vtype)
        if fmt is None:
            raise TokenizerLoadError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]


def read_gguf_metadata(path: str) -> dict[str, Any]:
    """Every metadata key of a GGUF file -> its value (str, int, float, bool or list)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            if buf[:4] != _MAGIC:
                raise TokenizerLoadError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
            cur.take(4)
            version = cur.u32()
            if version not in (2, 3):
                raise TokenizerLoadError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            cur.u64()  # tensor count: tensors are the worker's business
            n_kv = cur.u64()
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                metadata[key] = cur.value(cur.u32())
            return metadata
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        raise TokenizerLoadError(f"cannot read GGUF file {path}: {e}") from e
