"""The answer cache: put an answer under its key, find keys, read one answer at a time.

    cache = AnswerCache(root)                     # or config.open_cache(args)
    found = cache.lookup("gpt-4o-mini", keys)     # {key: Location}, values not read
    for key, value in cache.get_many("gpt-4o-mini", keys): ...
    cache.put("gpt-4o-mini", key, {"response": ..., "batch_id": ..., "created": ...})
    cache.close()                                 # or use it as a context manager

Memory: ``lookup`` scans the namespace's segments a block at a time, reading only each
line's key, and keeps a ``Location`` (segment, offset) per key asked for; ``get`` seeks
and reads one line. What it holds is O(keys asked for), never O(cache size). When a key
was put twice (two runs answered the same request) the first entry wins: segments are
read in name order (creation time first) and lines in file order.

The cache is a copy (the output files are the durable record): a write fault (disk full,
permissions) is one warning and turns writing off for the rest of the run; a damaged line
is skipped with a warning; neither stops the caller. Callers put only successes: never an
error, an expired or cancelled request or a failed record.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from datagen.cache.keys import check_key, namespace_folder
from datagen.cache.segments import READ_SIZE, SegmentWriter, is_entry, list_segments, read_line, scan
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps_bytes, loads

log = logging.getLogger("datagen.cache")
META = "namespace.json"  # in each namespace folder: {"namespace": NAME}


class Location(NamedTuple):
    """Where one entry is: valid until the cache is cleared or compacted (look up again later)."""
    segment: str
    offset: int


class AnswerCache:
    """One cache folder. ``read``/``write`` off make ``lookup`` find nothing / ``put`` keep nothing
    (``--refresh_cache`` reads nothing and writes; ``--no_cache`` has no cache at all)."""

    def __init__(self, root: str | os.PathLike, *, read: bool = True, write: bool = True):
        self.root = Path(root)
        self.read = read
        self.write = write
        self.skipped = 0  # damaged lines the last lookup skipped
        self._writers: dict[str, SegmentWriter] = {}
        self._reading = None  # the segment ``get`` read last, kept open: hits mostly come one segment after another
        self._exit_hook = False

    def folder(self, namespace: str) -> Path:
        return self.root / namespace_folder(namespace)

    # --- reading ---------------------------------------------------------------------

    def lookup(self, namespace: str, keys: Iterable[str]) -> dict[str, Location]:
        """Where each of ``keys`` that the cache holds is, in segment and file order."""
        if not self.read:
            return {}
        wanted = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        own = self._writers.get(namespace)
        if own is not None and own.pid == os.getpid():
            self._guard(own.flush)  # this process's own puts are found too
        for _ in range(3):  # a segment removed meanwhile (--compact, --clear): list again
            found, vanished = self._scan(namespace, wanted)
            if not vanished:
                break
        return found

    def _scan(self, namespace: str, wanted) -> tuple[dict[str, Location], bool]:
        found: dict[str, Location] = {}
        stats = {"torn": 0}
        bad = 0
        for segment in list_segments(self.folder(namespace)):
            if len(found) == len(wanted):
                break
            name = str(segment)
            try:
                for offset, line in scan(segment, stats):
                    key = line[:64].decode("latin-1")
                    if not is_entry(line):
                        bad += not line.startswith(b"#")
                    elif key in wanted and key not in found:
                        found[key] = Location(name, offset)
            except FileNotFoundError:
                return found, True
            except OSError as exc:
                log.warning("answer cache: cannot read %s (%s); its entries are not used", segment, exc.strerror)
        self.skipped = bad
        if bad:
            log.warning("answer cache: skipped %d damaged line(s) in %s (%s)", bad, namespace, self.folder(namespace))
        if stats["torn"]:  # a writer killed mid-line, or one writing right now
            log.debug("answer cache: %d segment(s) of %s end in a partial line", stats["torn"], namespace)
        return found, False

    def holds(self, namespace: str) -> bool:
        """True when the namespace has segments (a lookup may find something); no file read."""
        return bool(list_segments(self.folder(namespace)))

    def get(self, location: Location) -> dict | None:
        """The value at ``location``; None (with a warning) when it is gone or damaged."""
        try:
            if self._reading is None or self._reading.name != location.segment:
                self._close_reading()
                self._reading = open(location.segment, "rb")
            return self._value(location, read_line(self._reading, location.offset))
        except OSError as exc:
            log.warning("answer cache: cannot read %s (%s)", location.segment, exc.strerror)
            return None

    def get_many(self, namespace: str, keys: Iterable[str]) -> Iterator[tuple[str, dict]]:
        """``(key, value)`` for each of ``keys`` the cache holds, each segment read once, in order."""
        handle = None
        try:
            for key, location in self.lookup(namespace, keys).items():
                if handle is None or handle.name != location.segment:
                    if handle is not None:
                        handle.close()
                    try:
                        handle = open(location.segment, "rb", buffering=READ_SIZE)
                    except OSError as exc:
                        log.warning("answer cache: cannot read %s (%s)", location.segment, exc.strerror)
                        handle = None
                        continue
                value = self._value(location, read_line(handle, location.offset))
                if value is not None:
                    yield key, value
        finally:
            if handle is not None:
                handle.close()

    @staticmethod
    def _value(location: Location, line: bytes | None) -> dict | None:
        try:
            value = loads(line[65:]) if line else None
        except ValueError:
            value = None
        if not isinstance(value, dict):
            log.warning("answer cache: a damaged entry at %s:%d is not used", location.segment, location.offset)
            return None
        return value

    # --- writing ---------------------------------------------------------------------

    def put(self, namespace: str, key: str, value: dict) -> None:
        """Keep ``value`` (a JSON object, as is) under ``key``. Call it for successes only."""
        if not self.write:
            return
        check_key(key)
        if not isinstance(value, dict):
            raise TypeError(f"a cache value is a dict, not {type(value).__name__}")
        try:
            line = b"%s\t%s\n" % (key.encode("ascii"), dumps_bytes(value))
        except UserError as exc:  # text that is not valid Unicode: this one answer is not kept
            log.warning("answer cache: an answer is not kept: %s", exc)
            return
        writer = self._writers.get(namespace)
        if writer is None or writer.pid != os.getpid():  # a forked child never appends to its parent's file
            folder = self._guard(self._prepare, namespace)
            if folder is None:
                return
            writer = self._writers[namespace] = SegmentWriter(folder)
            if not self._exit_hook:
                atexit.register(self.close)
                self._exit_hook = True
        self._guard(writer.append, line)

    def _prepare(self, namespace: str) -> Path:
        """The namespace's folder, with its name file (written whole: temp file, rename)."""
        folder = self.folder(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / META).exists():
            fd, tmp = tempfile.mkstemp(prefix=".namespace-", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as handle:
                handle.write(dumps_bytes({"namespace": namespace}) + b"\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, folder / META)
        return folder

    def _guard(self, action, *args):
        """Run a write step; a fault is one warning and writing stops (the cache is a copy)."""
        try:
            return action(*args)
        except OSError as exc:
            log.warning("answer cache: cannot write in %s (%s); answers are not cached for the rest "
                        "of this run", self.root, exc.strerror or exc)
            self.write = False
            for writer in self._writers.values():
                writer.discard()
            self._writers.clear()
            return None

    def flush(self) -> None:
        """Hand every waiting put to the operating system (a kill of this process then keeps it)."""
        for writer in list(self._writers.values()):
            if writer.pid == os.getpid():
                self._guard(writer.flush)

    def _close_reading(self) -> None:
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.close()

    def close(self) -> None:
        """Write out, fsync and close every segment this process writes (and the one ``get`` reads)."""
        self._close_reading()
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            if writer.pid == os.getpid():
                self._guard(writer.close)

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
