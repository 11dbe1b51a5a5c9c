"""Streaming JSONL reading and atomic writing, and the suite's one JSON codec.

- ``dumps`` / ``dumps_bytes`` / ``loads``: compact UTF-8 JSON through orjson (about 2.5x
  faster than the standard library), falling back to the standard library, with
  identical bytes, where orjson is missing or refuses a value (integers over 64 bits).

- ``iter_jsonl(path)`` yields ``(line_number, object)`` one line at a time; a line that
  is not JSON, is nested too deep, holds a lone surrogate (not valid Unicode) or a number
  that is not finite (NaN, Infinity, -Infinity, 1e999) raises ``UserError`` naming
  ``file:line``.
- ``atomic_writer(path)`` writes to a temporary file beside ``path`` and renames it
  into place only when the block finishes without an exception (signals and a full
  disk included): an output file is either complete or absent.
- ``sha256_file(path)``: a file's content hash (batch inputs, adapter weights).
- ``AppendJsonl(path)`` is the one sanctioned exception: an append-only file whose
  every record is written whole and fsynced as it is written (resumable generation).

OS faults while writing (disk full, read-only, permissions) become one ``UserError``
line naming the path the user gave; devices and FIFOs are refused as outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

from datagen.common.files import describe_os_error, refuse_non_regular
from datagen.common.signals import held_signals
from datagen.common.errors import UserError

try:  # optional speed-up; the standard library writes the same bytes
    import orjson
except ImportError:  # pragma: no cover - exercised by a test that hides orjson
    orjson = None


class UnusableJSON(ValueError):
    """Valid JSON syntax that cannot be used: nested too deep, or not valid Unicode."""


_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 1024  # orjson's nesting limit; the standard library stops near the recursion limit


def _surrogate_message(text: str) -> str:
    found = _SURROGATE.search(text)
    around = text[max(0, found.start() - 20):found.start() + 20]
    return (f"lone surrogate \\u{ord(found.group()):04x} in the text {ascii(around)}: not valid Unicode "
            "(surrogate escapes come in pairs, like \\ud83d\\ude00); fix the text")


def _lone_surrogate(obj: Any) -> str | None:
    """The first text (key or value) in ``obj`` holding a lone surrogate; iterative, so
    any depth the parser accepted is fine."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _refuse_constant(name: str) -> Any:
    raise UnusableJSON(f"{name} is not a number JSON allows (JSON has no NaN or infinity); "
                       "write a number, or null where there is none")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise UnusableJSON(f"the number {_short(text, 30)} is too large for a double (it would read as "
                           "infinity); write a smaller number")
    return value


def _std_loads(data: bytes | str) -> Any:
    """The standard library's parser, refusing what orjson refuses for good reasons:
    NaN, Infinity, -Infinity and numbers that overflow to infinity included (the
    standard library would read them as floats that are not numbers)."""
    try:
        # bytes are decoded with surrogatepass: lone surrogates get through
        obj = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise UnusableJSON(f"JSON nested too deep (over {MAX_DEPTH:,} levels of arrays or objects); "
                           "flatten the data") from None
    text = _lone_surrogate(obj)
    if text is not None:
        raise UnusableJSON(_surrogate_message(text))
    return obj


def _std_dumps_bytes(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: never write invalid UTF-8
        raise UserError(f"cannot write JSON: {_surrogate_message(text)}") from None


def _std_dumps(obj: Any) -> str:
    return _std_dumps_bytes(obj).decode("utf-8")


if orjson is not None:
    _OPTIONS = orjson.OPT_SERIALIZE_NUMPY

    def dumps(obj: Any) -> str:
        """One compact JSON line (no trailing newline), UTF-8 kept as is. Text that is not
        valid Unicode (a lone surrogate) raises UserError instead of being written."""
        try:
            return orjson.dumps(obj, option=_OPTIONS).decode()
        except TypeError:  # integers over 64 bits, unusual types, surrogates: the stdlib decides
            return _std_dumps(obj)

    def dumps_bytes(obj: Any) -> bytes:
        """``dumps`` as UTF-8 bytes, without a round trip through str."""
        try:
            return orjson.dumps(obj, option=_OPTIONS)
        except TypeError:
            return _std_dumps_bytes(obj)

    def loads(data: bytes | str) -> Any:
        """Parse JSON; on failure the standard library's error (and message) is raised, or
        ``UnusableJSON`` (a ValueError) for nesting too deep and lone surrogates."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return _std_loads(data)  # the stdlib's message, or what orjson refuses (huge ints, NaN)
else:  # pragma: no cover
    dumps = _std_dumps
    dumps_bytes = _std_dumps_bytes
    loads = _std_loads


def cell_text(value: Any) -> str:
    """A value as one text cell: null is empty, true/false, lists and objects as compact
    JSON, anything else as ``str``. The CSV tables write cells so, and templates fill
    placeholders so, so a CSV, JSONL or Parquet table gives the same prompt."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return dumps(value)
    return str(value)


def _short(text: str, limit: int = 60) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, obj)`` for each line of a JSONL file, streaming.

    Blank lines are skipped. A malformed line (not JSON, not UTF-8, nested too deep, a
    lone surrogate) raises ``UserError("FILE:LINE: ...")``; a read fault, one naming the file.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a .jsonl file") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied; check the file's permissions") from None
    except OSError as exc:
        raise UserError(describe_os_error(exc, path)) from None
    # Only this generator's own reading and parsing can raise here: the consumer's
    # exceptions never pass through it.
    try:
        with handle:
            for line_number, line in enumerate(handle, start=1):
                try:
                    yield line_number, loads(line)
                except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                    if not line.strip():
                        continue  # checked only here: blank lines are rare, parsing is the hot path
                    raise _line_error(path, line_number, line, exc) from None
    except OSError as exc:
        raise UserError(describe_os_error(exc, path)) from None


def _line_error(path: Path, line_number: int, line: bytes, exc: ValueError) -> UserError:
    if isinstance(exc, UnusableJSON):
        return UserError(f"{path}:{line_number}: {exc}")
    if isinstance(exc, UnicodeDecodeError):
        return UserError(f"{path}:{line_number}: not UTF-8 text ({exc.reason}); save the file as UTF-8")
    if isinstance(exc, json.JSONDecodeError):  # "Unterminated string starting at" + " column 38"
        detail = f"{exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"
    else:
        detail = str(exc)
    text = f"{path}:{line_number}: not valid JSON ({detail}): {_short(line.decode('utf-8', 'replace'))!r}"
    if not line.endswith(b"\n"):  # only the last line can end without one: cut off by a kill
        if b'"custom_id"' in line and b'"generated_text"' in line:
            return UserError(f"{text}; the last line is cut off: the generation that wrote this file was "
                             "interrupted; rerun the same generate_data_finetuned.py command to repair it "
                             "(finished records are kept)")
        return UserError(f"{text}; the last line is cut off (was the program writing it interrupted?)")
    return UserError(f"{text}; each line must be one JSON object")


def iter_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Like ``iter_jsonl`` but every line must be a JSON object."""
    for line_number, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise UserError(
                f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}; "
                "each line must be one JSON object"
            )
        yield line_number, obj


def write_error(exc: OSError, path: str | os.PathLike) -> UserError:
    """The one-line error for an OS fault while writing ``path`` (the user's path, not
    the temporary file's: a write error carries no file name)."""
    return UserError(describe_os_error(exc, path))


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex), read a megabyte at a time."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def temp_path_beside(path: Path) -> Path:
    """A fresh, unused temporary file name in the same folder as ``path``.

    The caller must record it for cleanup inside ``held_signals()`` (with this call), so
    that a signal cannot leave it behind unrecorded.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:
        raise write_error(exc, path) from None
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode an ordinary new file would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


class _NamedFaults:
    """A file object whose write and flush errors name ``path`` (writes carry no file
    name, and the temporary file's would mean nothing to the user)."""

    def __init__(self, handle: IO, path: Path):
        self._handle, self._path = handle, path

    def write(self, data):
        try:
            return self._handle.write(data)
        except OSError as exc:
            raise write_error(exc, self._path) from None

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as exc:
            raise write_error(exc, self._path) from None

    def __getattr__(self, name: str):
        return getattr(self._handle, name)

    def __iter__(self):
        return iter(self._handle)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` on success.

    On any exception (KeyboardInterrupt, ``signals.Terminated`` and a full disk included)
    the temporary file is removed and ``path`` is left exactly as it was. OS faults
    become ``UserError`` naming ``path``; a device, FIFO or socket at ``path`` is refused
    (never renamed over). A link to a regular file is replaced by the new file.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it first")
    refuse_non_regular(path)
    tmp = handle = None
    try:
        with held_signals():  # recorded for cleanup before a signal can stop us
            tmp = temp_path_beside(path)
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        try:
            handle = open(tmp, mode, **kwargs)
        except OSError as exc:
            raise write_error(exc, path) from None
        yield _NamedFaults(handle, path)
        try:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            refuse_non_regular(path)  # appeared meanwhile: never rename over a device
            os.replace(tmp, path)
        except OSError as exc:
            raise write_error(exc, path) from None
    except BaseException:
        with held_signals():  # a second signal must not cut the cleanup short
            if handle is not None:
                with contextlib.suppress(OSError):  # flushing again on a full disk fails again
                    handle.close()
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        raise


class AppendJsonl:
    """An append-only JSONL file: each ``write`` is whole lines, written and fsynced.

    Used where losing finished work costs more than the sync (a killed job resumes
    from what is on disk). Every write reaches the file at once (unbuffered: a killed
    process loses nothing written); with ``sync_interval`` S the fsync (which only a
    crash of the machine needs) runs at most every S seconds and at close, for a
    writer of many small records (an fsync costs milliseconds). A torn last line from a
    kill is repaired on open: the partial line is cut off so the next record starts on a
    fresh line. A write that
    fails (disk full) or is interrupted is cut off again at once, so the file always
    ends with a whole line; the failure is a ``UserError`` naming the file. A device,
    FIFO or socket is refused (reading one for resume could block forever).
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, sync_interval: float = 0.0):
        self.path = Path(path)
        self.fsync = fsync
        self.sync_interval = sync_interval
        self._synced = time.monotonic()
        self._unsynced = False
        refuse_non_regular(self.path)
        try:
            repair_torn_tail(self.path)
            # Unbuffered: nothing is held back to be flushed (and fail again) at close.
            self._file = open(self.path, "ab", buffering=0)
            self._size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise write_error(exc, self.path) from None

    def write(self, obj: Any) -> None:
        self.write_many([obj])

    def write_many(self, objs) -> None:
        data = b"".join(dumps_bytes(obj) + b"\n" for obj in objs)
        if not data:
            return
        try:
            # A signal waits for the write and its fsync: finished records are never cut back.
            with held_signals():
                view = memoryview(data)
                while view:
                    view = view[self._file.write(view):]
                self._unsynced = True
                if self.fsync and time.monotonic() - self._synced >= self.sync_interval:
                    self._sync()
                self._size += len(data)  # written whole: a signal raised as the block ends keeps it
        except BaseException as exc:
            with contextlib.suppress(OSError):  # keep the file whole lines
                os.ftruncate(self._file.fileno(), self._size)
            if isinstance(exc, OSError):
                raise write_error(exc, self.path) from None
            raise

    def _sync(self) -> None:
        os.fsync(self._file.fileno())
        self._synced, self._unsynced = time.monotonic(), False

    def close(self) -> None:
        try:
            if self.fsync and self._unsynced and not self._file.closed:
                self._sync()
            self._file.close()
        except OSError as exc:
            raise write_error(exc, self.path) from None

    def __enter__(self) -> "AppendJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write killed halfway). Returns bytes cut."""
    if not path.exists():
        return 0
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        # Walk back to the last newline.
        pos = size - 1
        chunk = 4096
        while pos > 0:
            start = max(0, pos - chunk)
            handle.seek(start)
            block = handle.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                new_size = start + idx + 1
                break
            pos = start
        else:
            new_size = 0
        handle.truncate(new_size)
        return size - new_size
