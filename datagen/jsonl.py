"""Streaming JSONL reading and atomic writing, and the suite's one JSON codec.

- ``dumps`` / ``dumps_bytes`` / ``loads``: compact UTF-8 JSON through orjson (about 2.5x
  faster than the standard library), falling back to the standard library, with
  identical bytes, where orjson is missing or refuses a value (integers over 64 bits).

- ``iter_jsonl(path)`` yields ``(line_number, object)`` one line at a time; a line that
  is not JSON raises ``UserError`` naming ``file:line``.
- ``atomic_writer(path)`` writes to a temporary file beside ``path`` and renames it
  into place only when the block finishes without an exception: an output file is
  either complete or absent.
- ``append_jsonl(path)`` is the one sanctioned exception: an append-only file whose
  every record is flushed and fsynced as it is written (resumable generation).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from datagen.errors import UserError

try:  # optional speed-up; the standard library writes the same bytes
    import orjson
except ImportError:  # pragma: no cover - exercised by a test that hides orjson
    orjson = None


def _std_dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str)


if orjson is not None:
    _OPTIONS = orjson.OPT_SERIALIZE_NUMPY

    def dumps(obj: Any) -> str:
        """One compact JSON line (no trailing newline), UTF-8 kept as is."""
        try:
            return orjson.dumps(obj, option=_OPTIONS).decode()
        except TypeError:  # integers over 64 bits, unusual types: the stdlib handles them
            return _std_dumps(obj)

    def dumps_bytes(obj: Any) -> bytes:
        """``dumps`` as UTF-8 bytes, without a round trip through str."""
        try:
            return orjson.dumps(obj, option=_OPTIONS)
        except TypeError:
            return _std_dumps(obj).encode("utf-8")

    def loads(data: bytes | str) -> Any:
        """Parse JSON; on failure the standard library's error (and message) is raised."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return json.loads(data)  # the stdlib's message, or what orjson refuses (huge ints, NaN)
else:  # pragma: no cover
    dumps = _std_dumps
    loads = json.loads

    def dumps_bytes(obj: Any) -> bytes:
        return _std_dumps(obj).encode("utf-8")


def _short(text: str, limit: int = 60) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, obj)`` for each line of a JSONL file, streaming.

    Blank lines are skipped. A malformed line raises ``UserError("FILE:LINE: ...")``.
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
    with handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                yield line_number, loads(line)
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                if not line.strip():
                    continue  # checked only here: blank lines are rare, parsing is the hot path
                if isinstance(exc, UnicodeDecodeError):
                    raise UserError(f"{path}:{line_number}: not UTF-8 text ({exc.reason}); "
                                    "save the file as UTF-8") from None
                detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise UserError(
                    f"{path}:{line_number}: not valid JSON ({detail}): "
                    f"{_short(line.decode('utf-8', 'replace'))!r}; each line must be one JSON object"
                ) from None


def iter_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Like ``iter_jsonl`` but every line must be a JSON object."""
    for line_number, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise UserError(
                f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}; "
                "each line must be one JSON object"
            )
        yield line_number, obj


def temp_path_beside(path: Path) -> Path:
    """A fresh, unused temporary file name in the same folder as ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode an ordinary new file would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` on success.

    On any exception (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left exactly as it was.
    """
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"{path}: folder {path.parent} does not exist; create it first")
    tmp = temp_path_beside(path)
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class AppendJsonl:
    """An append-only JSONL file: each ``write`` is one whole line, flushed and fsynced.

    Used where losing finished work costs more than the sync (a killed job resumes
    from what is on disk). A torn last line from a kill is repaired on open: the
    partial line is cut off so the next record starts on a fresh line.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        repair_torn_tail(self.path)
        self._handle = open(self.path, "a", encoding="utf-8", newline="\n")

    def write(self, obj: Any) -> None:
        self.write_many([obj])

    def write_many(self, objs) -> None:
        data = "".join(dumps(obj) + "\n" for obj in objs)
        if not data:
            return
        self._handle.write(data)
        self._handle.flush()
        if self.fsync:
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

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
