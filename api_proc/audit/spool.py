"""The audit spool: an append-only local file of framed rows, fsynced before the database sees them.

    STATE_DIR/audit-spool/
      api-0.TAG.spool     one file per writer (an api process, a batch job), held with flock
      api-1.TAG.spool     while it runs; a second writer of the same name takes api-0.1.TAG.spool;
      batch.TAG.spool     TAG: 8 hex digits of SHA-256 of the store URL

    file:   frame frame frame ...              [0, committed) in the database, [committed, end) not yet
    frame:  u32 length | u32 crc32 | payload   (little endian; payload: an msgpack AuditRow)

A writer appends a batch of frames and fsyncs before it writes them to the database, so a row
is on disk before anything depends on it. Once the database has taken every frame, the file is
cut back to empty (when it has grown past ``ROTATE_BYTES``, or at a clean close, when it is
removed). A writer killed (kill -9, power loss after the fsync) leaves its file behind: the
next writer of that name finds the frames in its own file, and any writer that starts adopts
the files of the same store nobody holds a lock on (copies their frames into its own file,
fsync, then removes them); all of it is then written to the database, where ``record_id`` makes a second insert of
the same row a no-op. A torn last frame (a write cut short) fails its length or CRC check and
is dropped with a warning: it was never fsynced, so nothing depended on it.

The spool is bounded (``max_bytes`` of frames not yet in the database): past it, ``append``
refuses the batch and the caller counts the rows as dropped.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import struct
import zlib

log = logging.getLogger("zeroserve.audit")

FRAME = struct.Struct("<II")  # payload length, crc32(payload)
ROTATE_BYTES = 1 << 20  # an all-committed file past this is cut back to empty
MAX_FRAME_BYTES = 64 << 20  # a length above this is corruption, not a row
SUFFIX = ".spool"
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_TAG = re.compile(r"[0-9a-f]{8}")


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def parse_frames(data: bytes) -> tuple[list[bytes], int]:
    """The whole frames at the start of ``data`` and the bytes they span; stops at the first
    frame that is cut short or fails its CRC."""
    out, pos = [], 0
    while pos + FRAME.size <= len(data):
        length, crc = FRAME.unpack_from(data, pos)
        start, stop = pos + FRAME.size, pos + FRAME.size + length
        if length > MAX_FRAME_BYTES or stop > len(data):
            break
        payload = data[start:stop]
        if zlib.crc32(payload) != crc:
            break
        out.append(payload)
        pos = stop
    return out, pos


def _store_tag(filename: str) -> str:
    """The store tag in ``NAME[.i][.TAG].spool`` ("" for none)."""
    head, _, tail = filename[: -len(SUFFIX)].rpartition(".")
    return tail if head and _TAG.fullmatch(tail) else ""


def _lock(path: str, create: bool) -> int | None:
    """An fd of ``path`` holding its exclusive flock, or None when another process holds it (or,
    with create=False, when it is gone). The inode is checked after locking: a file an adopter
    removed meanwhile is not one to write into."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return _lock(path, create) if create else None
    return fd


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, pos = [], 0
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 24), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


class Spool:
    def __init__(self, directory: str, name: str, max_bytes: int = 256 << 20, store: str = ""):
        """``store``: the database the rows are for; only spools of the same store are adopted
        (deployments that share a state dir but not a database keep to their own)."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"spool name {name!r}: letters, digits, '_', '-' only")
        self.directory = directory
        self.name = name
        self.tag = hashlib.sha256(store.encode()).hexdigest()[:8] if store else ""
        self.suffix = (f".{self.tag}" if store else "") + SUFFIX
        self.max_bytes = max_bytes
        self.path = ""
        self.fd = -1
        self.end = 0  # bytes of whole frames in the file
        self.committed = 0  # frames before this offset are in the database

    # ------------------------------------------------------------------ open / close

    def open(self) -> int:
        """Lock this writer's file, keep its whole frames, adopt unlocked files of dead writers.
        Returns how many frames wait for the database (left by a previous run or adopted)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        for i in range(1000):
            path = os.path.join(self.directory, self.name + (f".{i}" if i else "") + self.suffix)
            fd = _lock(path, create=True)
            if fd is not None:
                self.path, self.fd = path, fd
                break
        else:
            raise OSError(f"no free spool file for {self.name!r} in {self.directory}")
        frames, self.end = self._whole_frames(self.fd, self.path)
        waiting = len(frames)
        for other in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, other)
            if other.endswith(SUFFIX) and _store_tag(other) == self.tag and path != self.path:
                waiting += self._adopt(path)
        return waiting

    def _whole_frames(self, fd: int, path: str) -> tuple[list[bytes], int]:
        data = _read_all(fd)
        frames, end = parse_frames(data)
        if end < len(data):
            log.warning(
                "audit spool %s: dropped a torn tail of %d bytes (a write cut short; never fsynced)",
                path,
                len(data) - end,
            )
            os.ftruncate(fd, end)
            os.fsync(fd)
        return frames, end

    def _adopt(self, path: str) -> int:
        fd = _lock(path, create=False)
        if fd is None:
            return 0  # its writer is alive (or another adopter took it)
        try:
            frames, _ = self._whole_frames(fd, path)
            if frames:
                self._write(b"".join(frame(p) for p in frames))
                log.info("audit spool: adopted %d record(s) left in %s", len(frames), path)
            os.unlink(path)
            return len(frames)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release the file; removed when the database has everything in it."""
        if self.fd < 0:
            return
        if self.committed >= self.end:
            try:
                os.unlink(self.path)  # still ours: we hold the lock, adopters skip locked files
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = -1

    # ------------------------------------------------------------------ write / read

    @property
    def pending_bytes(self) -> int:
        return self.end - self.committed

    def append(self, payloads: list[bytes]) -> bool:
        """Frame, write and fsync the payloads; False (nothing written) when that would take the
        bytes not yet in the database past ``max_bytes``."""
        data = b"".join(frame(p) for p in payloads)
        if self.pending_bytes + len(data) > self.max_bytes:
            return False
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        view, pos = memoryview(data), self.end
        try:
            while view:
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n
            os.fsync(self.fd)
        except OSError:
            os.ftruncate(self.fd, self.end)  # a disk-full half frame must not hide later ones
            raise
        self.end = pos

    def read_pending(self, max_bytes: int = 4 << 20) -> tuple[list[bytes], int]:
        """Frames from ``committed`` (at least one, then up to about max_bytes), and the offset after them."""
        if not self.pending_bytes:
            return [], self.committed
        length, _ = FRAME.unpack(os.pread(self.fd, FRAME.size, self.committed))
        size = min(self.pending_bytes, max(max_bytes, FRAME.size + length))
        frames, span = parse_frames(os.pread(self.fd, size, self.committed))
        return frames, self.committed + span

    def commit(self, offset: int) -> None:
        """Frames before ``offset`` are in the database."""
        self.committed = offset
        if self.committed >= self.end and self.end >= ROTATE_BYTES:
            os.ftruncate(self.fd, 0)
            os.fsync(self.fd)
            self.end = self.committed = 0
