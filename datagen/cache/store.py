"""The answer cache: put an answer under its key, find keys, read one answer at a time.

    cache = AnswerCache(root)                     # or config.open_cache(args)
    found = cache.lookup("gpt-4o-mini", keys)     # {key: Location}, values not read
    for key, value in cache.get_many("gpt-4o-mini", keys): ...
    cache.put("gpt-4o-mini", key, {"response": ..., "batch_id": ..., "created": ...})
    cache.close()                                 # or use it as a context manager

Many keys at once (a rerun of a million requests): ``take`` / ``take_values`` take a dict
of 32-byte keys (``keys.openai_digest``) -> a payload of the caller's (a line number, a
custom_id) and yield the payload of each key found, taken out of the dict, so that what
is left is what the cache does not hold; no second dict of results is built.

Memory: a lookup scans the namespace's segments a block at a time, reading only each
line's key, and keeps a ``Location`` (segment, offset) per key asked for; ``get`` seeks
and reads one line; ``get_many`` and ``take_values`` read each value as the scan passes
it. What it holds is O(keys asked for), never O(cache size). When a key was put twice
(two runs, or a ``--refresh_cache`` run, answered the same request) the newest entry
wins: segments are read newest name (creation time) first, so a refreshed answer replaces
the old one for every later run, and the same key always gives the same answer until then.

The cache is a copy (the output files are the durable record): a write fault (disk full,
permissions) is one warning and turns writing off for the rest of the run; a damaged line
is skipped with a warning; neither stops the caller. Callers put only successes: never an
error, an expired or cancelled request or a failed record.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from datagen.cache.keys import KEY_PATTERN, check_key, namespace_folder
from datagen.cache.segments import SegmentWriter, list_segments, read_line, take_entries
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps_bytes, loads

log = logging.getLogger("datagen.cache")
META = "namespace.json"  # in each namespace folder: {"namespace": NAME}


def utc_date(stamp: float | None) -> str | None:
    """When an answer was made, as both routes' ``cached`` field says it: ``2026-12-07T13:39:22Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if stamp else None


class Location(NamedTuple):
    """Where one entry is: valid until the cache is cleared or compacted (look up again later)."""
    segment: str
    offset: int


def _digests(keys: Iterable[str]) -> dict[bytes, str]:
    """32-byte key -> its 64-hex ``key``, for each of ``keys`` that is a key (others never hit)."""
    return {bytes.fromhex(key): key for key in keys if isinstance(key, str) and KEY_PATTERN.fullmatch(key)}


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
        return {key: location for _, key, location, _ in self._take(namespace, _digests(keys))}

    def take(self, namespace: str, wanted: dict[bytes, Any]) -> Iterator[tuple[bytes, Any, Location]]:
        """``(key, payload, Location)`` for each key of ``wanted`` (32-byte key -> a payload of
        the caller's) the cache holds, in segment and file order, taken out of ``wanted``:
        what is left in it at the end is not in the cache. Stops once ``wanted`` is empty."""
        for key, payload, location, _ in self._take(namespace, wanted):
            yield key, payload, location

    def take_values(self, namespace: str, wanted: dict[bytes, Any]) -> Iterator[tuple[bytes, Any, dict]]:
        """As ``take``, with each entry's value instead of its place: one pass over the
        namespace reads key and value together (a damaged value is a warning, and skipped)."""
        for key, payload, location, raw in self._take(namespace, wanted, values=True):
            value = self._value(location, raw)
            if value is not None:
                yield key, payload, value

    def _take(self, namespace: str, wanted: dict, values: bool = False) -> Iterator[tuple]:
        """One scan of the namespace's segments for ``wanted`` (the newest entry wins: segments
        newest name first, then lines in file order), listed again when a segment is removed meanwhile
        (--compact, --clear); ``(key, payload, Location, value bytes or None)``."""
        if not self.read or not wanted:
            return
        own = self._writers.get(namespace)
        if own is not None and own.pid == os.getpid():
            self._guard(own.flush)  # this process's own puts are found too
        for _ in range(3):
            stats = {"bad": 0, "torn": 0}
            vanished = False
            for segment in reversed(list_segments(self.folder(namespace))):  # the newest first
                if not wanted:
                    break
                name = str(segment)
                try:
                    for key, payload, offset, raw in take_entries(segment, wanted, stats, values):
                        yield key, payload, Location(name, offset), raw
                except FileNotFoundError:
                    vanished = True
                    break
                except OSError as exc:
                    log.warning("answer cache: cannot read %s (%s); its entries are not used", segment,
                                exc.strerror)
            if not vanished:
                break
        self._report(namespace, stats)

    def _report(self, namespace: str, stats: dict) -> None:
        self.skipped = stats["bad"]
        if stats["bad"]:
            log.warning("answer cache: skipped %d damaged line(s) in %s (%s)", stats["bad"], namespace,
                        self.folder(namespace))
        if stats["torn"]:  # a writer killed mid-line, or one writing right now
            log.debug("answer cache: %d segment(s) of %s end in a partial line", stats["torn"], namespace)

    def holds(self, namespace: str) -> bool:
        """True when the namespace has segments (a lookup may find something); no file read."""
        return bool(list_segments(self.folder(namespace)))

    def get(self, location: Location) -> dict | None:
        """The value at ``location``; None (with a warning) when it is gone or damaged."""
        try:
            if self._reading is None or self._reading.name != location.segment:
                self._close_reading()
                self._reading = open(location.segment, "rb")
            line = read_line(self._reading, location.offset)
            return self._value(location, line[65:] if line else None)
        except OSError as exc:
            log.warning("answer cache: cannot read %s (%s)", location.segment, exc.strerror)
            return None

    def get_many(self, namespace: str, keys: Iterable[str]) -> Iterator[tuple[str, dict]]:
        """``(key, value)`` for each of ``keys`` the cache holds, in segment and file order."""
        for _, key, value in self.take_values(namespace, _digests(keys)):
            yield key, value

    @staticmethod
    def _value(location: Location, data: bytes | None) -> dict | None:
        """The JSON object an entry holds after its key and tab (``data``), or None with a warning."""
        try:
            value = loads(data) if data else None
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
