"""A small GGUF reader: metadata and tensor infos from the header, tensor bytes by memmap.

Why not `gguf.GGUFReader`: it builds a numpy view for every element of every metadata array,
so the 49,152-token vocabulary of the default model alone costs 4-7 s on a loaded 2-core box,
before a single weight is read. Here metadata arrays of strings (the tokenizer vocabulary and
merges) are skipped and only counted, which makes reading the config ~instant. Dequantizing
is still done by the `gguf` package (`gguf.quants.dequantize`).

File layout (GGUF v2/v3, little-endian):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x      (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset

`ne` is ggml's order, fastest-varying dimension first: a torch weight [out, in] is stored with
ne = [in, out], so the torch shape is `tuple(reversed(ne))`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import CorruptCheckpointError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of one scalar (8 = string and 9 = array are special).
_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """A metadata array of strings that was skipped, not decoded: only its length is kept."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int  # raw id; may be a type this `gguf` version does not know
    ne: tuple[int, ...]  # ggml order (fastest first)
    offset: int  # absolute byte offset in the file
    nbytes: int  # 0 when the type is unknown (size cannot be computed)

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch shape (slowest dimension first)."""
        return tuple(reversed(self.ne))

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"unknown type {self.ggml_type}"


class _Cursor:
    """Reads little-endian values from a buffer; any read past the end means a truncated file."""

    def __init__(self, buf: mmap.mmap | bytes, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise CorruptCheckpointError(
                f"{self.path}: the GGUF header ends early at byte {len(self.buf)}: the file is "
                "truncated or not a GGUF file; download it again",
                path=self.path,
            )
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            self.take(f"<{n}s")  # raises the truncation error
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, decode_strings: bool) -> Any:
        if vtype == 6:  # float32: the shortest decimal that round-trips (1e-05, not 9.99999974e-06)
            return float(str(np.float32(self.take("<f"))))
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize * count
                if self.pos + size > len(self.buf):
                    self.take(f"<{size}s")
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += size
                return arr.tolist() if count <= 64 else arr
            if etype == _STRING and not decode_strings and count > 64:
                for _ in range(count):  # skip: u64 length + bytes each
                    n = self.take("<Q")
                    self.pos += n
                if self.pos > len(self.buf):
                    self.take("<B")
                return StringArray(count)
            return [self.value(etype, decode_strings) for _ in range(count)]
        raise CorruptCheckpointError(
            f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}: the file is "
            "corrupt or from a newer GGUF version",
            path=self.path,
        )


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `tensors` (name -> info), `raw(info)`.

    Tensor bytes are read lazily through a read-only memory map, so opening a file is cheap
    and holds no weights in memory. Use as a context manager or call `close()`.
    """

    def __init__(self, path: str, *, decode_string_arrays: bool = False):
        self.path = path
        self._file = open(path, "rb")
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 24:
                raise CorruptCheckpointError(
                    f"{path}: {size} bytes is too small for a GGUF file (truncated or empty)", path=path
                )
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self.file_size = size
            self._parse(decode_string_arrays)
        except BaseException:
            self.close()
            raise

    def _parse(self, decode_string_arrays: bool) -> None:
        path, cur = self.path, _Cursor(self._map, self.path)
        if bytes(self._map[:4]) != _MAGIC:
            raise CorruptCheckpointError(
                f"{path}: not a GGUF file (magic {bytes(self._map[:4])!r}, expected b'GGUF')", path=path
            )
        cur.pos = 4
        self.version = cur.take("<I")
        if self.version not in (2, 3):
            raise CorruptCheckpointError(
                f"{path}: GGUF version {self.version} is not supported (2 and 3 are; a big-endian "
                "file also shows up here: convert it to little-endian)",
                path=path,
            )
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("<I"), decode_string_arrays)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            ne = tuple(cur.take("<Q") for _ in range(n_dims))
            infos.append((name, ne, cur.take("<I"), cur.take("<Q")))
        align = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, ggml_type, rel in infos:
            info = GGUFTensorInfo(name, ggml_type, ne, data_start + rel, _nbytes(ne, ggml_type))
            if info.offset + info.nbytes > self.file_size:
                raise CorruptCheckpointError(
                    f"{path}: tensor {name!r} ({info.type_name}, bytes {info.offset}..{info.offset + info.nbytes}) "
                    f"lies past the end of the file ({self.file_size} bytes): the file is truncated; "
                    "download it again",
                    path=path,
                    tensor=name,
                )
            self.tensors[name] = info

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [*shape[:-1], bytes_per_row] (the layout that
        `gguf.quants.dequantize` takes); a view into the memory map, no copy."""
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
        row_bytes = info.ne[0] // block * type_size
        flat = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return flat.reshape(*info.shape[:-1], row_bytes)

    def close(self) -> None:
        if getattr(self, "_map", None) is not None:
            try:
                self._map.close()
            except BufferError:  # a numpy view still points into the map: leave it to the GC
                pass
            self._map = None
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return 0
    n = 1
    for d in ne:
        n *= d
    return n // block * type_size
