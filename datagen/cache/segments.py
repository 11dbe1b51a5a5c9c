"""The cache's files: append-only segments, one writer each, read by scanning.

A segment is one writer's file, ``<UTC time>-<host>-<pid>-<random>.seg``, created fresh
(``O_EXCL``) by one process and never appended by another: SLURM array tasks on NFS can
write one cache folder at once without any lock (flock/fcntl are unreliable on NFS). Each
line is ``<64-hex key>\\t<JSON object>\\n``; a writer that closes cleanly ends its file
with ``#closed``. Readers take only whole lines: a last line without its newline (a writer
killed mid-write, or one still writing) is not an entry, and a line that is not
``key<TAB>{...}`` is skipped and counted.

``SegmentWriter`` buffers lines and writes them out when 256 KiB are waiting or one second
after the first waiting line (a timer thread), with an fsync at most once a second, and
at ``close``: a SIGKILL loses at most the last second of puts, never a torn entry.
"""

from __future__ import annotations

import binascii
import calendar
import contextlib
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

SUFFIX = ".seg"
CLOSED = b"#closed\n"
READ_SIZE = 1 << 20  # bytes read at a time by a scan
FLUSH_BYTES = 256 << 10  # written out at once beyond this much waiting
FLUSH_SECONDS = 1.0  # the longest a put waits in memory; fsync at most this often
_NAME = re.compile(r"(\d{8}T\d{6})\.(\d{6})Z-(.+)-(\d+)-([0-9a-f]+)\.seg")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname())[:40] or "host"


def segment_name(now: float | None = None) -> str:
    """A fresh segment's name: time first, so sorted names are (about) creation order."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{stamp}-{_host()}-{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"


def created(path: Path) -> float | None:
    """When a segment was created, from its name (None when the name is not ours)."""
    found = _NAME.fullmatch(path.name)
    if not found:
        return None
    return calendar.timegm(time.strptime(found.group(1), "%Y%m%dT%H%M%S")) + int(found.group(2)) / 1e6


def list_segments(folder: Path) -> list[Path]:
    """A namespace folder's segments, oldest name first (lookups read them newest first)."""
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def is_closed(path: Path) -> bool:
    """True when the segment's writer closed it (its last line is ``#closed``)."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < len(CLOSED):
            return False
        handle.seek(-len(CLOSED), os.SEEK_END)
        return handle.read() == CLOSED


def writer_gone(path: Path, stale_seconds: float) -> bool:
    """True when no writer can still append to ``path``: it closed the file; or it ran on
    this host and its process is gone; or the file is untouched for ``stale_seconds``."""
    if is_closed(path):
        return True
    found = _NAME.fullmatch(path.name)
    if found and found.group(3) == _host():
        try:
            os.kill(int(found.group(4)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            pass
    return time.time() - path.stat().st_mtime > stale_seconds


def scan(path: Path, stats: dict | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, line)`` for each whole line of a segment (newline dropped), reading
    ``READ_SIZE`` bytes at a time: memory is one read, whatever the file's size. A last
    line without its newline is counted in ``stats["torn"]``, never yielded."""
    offset = 0
    carry = b""
    with open(path, "rb", buffering=0) as handle:
        while True:
            block = handle.read(READ_SIZE)
            if not block:
                break
            lines = (carry + block if carry else block).split(b"\n")
            del block  # memory: one block's lines at a time
            carry = lines.pop()  # no newline (yet): the next block completes it, or it is torn
            for line in lines:
                yield offset, line
                offset += len(line) + 1
    if carry and stats is not None:
        stats["torn"] = stats.get("torn", 0) + 1


def take_entries(path: Path, wanted: dict, stats: dict, values: bool = False) -> Iterator[tuple]:
    """Take from ``wanted`` (32-byte key -> anything) each key the segment holds, in file
    order: yield ``(key, wanted.pop(key), offset, value)``, ``value`` the line's JSON bytes
    when ``values`` (else None); stop once ``wanted`` is empty. Reads ``READ_SIZE`` bytes at a
    time and makes no object for a line but its key: a scan of the whole cache costs about
    a second a million lines. Counts damaged lines in ``stats["bad"]`` and a last line
    without its newline in ``stats["torn"]`` (never yielded)."""
    offset = 0  # where ``block`` starts in the file
    carry = b""
    with open(path, "rb", buffering=0) as handle:
        while wanted:
            data = handle.read(READ_SIZE)
            if not data:
                if carry:
                    stats["torn"] += 1
                return
            block = carry + data if carry else data
            start = 0
            while (end := block.find(b"\n", start)) >= 0:
                if end - start > 66 and block[start + 64:start + 66] == b"\t{" and block[end - 1] == 125:  # "}"
                    try:
                        key = binascii.a2b_hex(block[start:start + 64])
                    except binascii.Error:  # the shape of an entry, a key that is not hex: never wanted
                        key = None
                    if key in wanted:
                        yield key, wanted.pop(key), offset + start, block[start + 65:end] if values else None
                        if not wanted:
                            return
                elif block[start] != 35:  # not a "#" marker line: damaged
                    stats["bad"] += 1
                start = end + 1
            carry = block[start:]
            offset += start


def read_line(handle, offset: int) -> bytes | None:
    """The whole line at ``offset`` (newline dropped), or None when it has no newline."""
    handle.seek(offset)
    line = handle.readline()
    return line[:-1] if line.endswith(b"\n") else None


def is_entry(line: bytes) -> bool:
    """The cheap shape check of an entry line: 64 key bytes, a tab, ``{...}``."""
    return line[64:66] == b"\t{" and line.endswith(b"}")


class SegmentWriter:
    """One process's append-only segment in ``folder``, created on the first write."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path: Path | None = None
        self.pid = os.getpid()
        self._fd: int | None = None
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self.failure: OSError | None = None  # a write fault in the timer thread, raised by the next call
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def append(self, line: bytes) -> None:
        """Queue one whole line (ending in a newline)."""
        with self._lock:
            self._raise_failure()
            self._waiting.append(line)
            self._waiting_bytes += len(line)
            if self._waiting_bytes >= FLUSH_BYTES:
                self._write_out()
            if self._timer is None:  # at most one second until written and synced
                self._timer = threading.Timer(FLUSH_SECONDS, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure

    def _on_timer(self) -> None:
        """One second after a line began to wait: write out and fsync (so at most once a second)."""
        with self._lock:
            self._timer = None
            try:
                self._write_out(sync=True)
            except OSError as exc:
                self.failure = exc

    def _write_out(self, sync: bool = False) -> None:
        """Write what waits (whole lines); then fsync if asked."""
        if self._waiting:
            if self._fd is None:
                self.path = self.folder / segment_name()
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            view = memoryview(b"".join(self._waiting))
            self._waiting, self._waiting_bytes = [], 0
            while view:
                view = view[os.write(self._fd, view):]
        if sync and self._fd is not None:
            os.fsync(self._fd)

    def flush(self) -> None:
        """Hand what waits to the operating system (no fsync: a kill cannot lose it)."""
        with self._lock:
            self._raise_failure()
            self._write_out()

    def close(self) -> None:
        """Write what waits, end the file with ``#closed``, fsync and close."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._raise_failure()
            if self._waiting or self._fd is not None:
                self._waiting.append(CLOSED)
                try:
                    self._write_out(sync=True)
                finally:
                    if self._fd is not None:
                        os.close(self._fd)
                    self._fd = None

    def discard(self) -> None:
        """Stop writing after a fault: what still waits is dropped, the file closed as it is."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._waiting, self._waiting_bytes = [], 0
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
