"""Paths and OS faults, for every command: an output that would overwrite an input or
a device, and one line (what happened, how to fix it) for a full disk, a permission or a
special file."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable

from datagen.common.errors import UserError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (following links), existing or not."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                      flag: str = "--output_file") -> Path:
    """Refuse an output path that is one of the inputs, a directory, a device, FIFO or
    socket (a link to a regular file is fine), or sits in a missing folder."""
    output = Path(output)
    for path in inputs:
        if same_file(output, path):
            raise UserError(
                f"{flag} {output} is the same file as the input {path}; "
                "choose another output path (the input would be overwritten)"
            )
    if output.is_dir():
        raise UserError(f"{flag} {output} is a directory; give a file name")
    refuse_non_regular(output, flag)
    parent = output.parent
    if not parent.exists():
        raise UserError(f"{flag} {output}: folder {parent} does not exist; create it first")
    return output


def file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists and is not a regular file (links followed), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # absent (or unreadable: opening it will say so)
    for test, kind in ((stat.S_ISREG, None), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def refuse_non_regular(path: str | os.PathLike, flag: str = "") -> None:
    """Raise UserError when ``path`` exists and is not a regular file: writing to a device
    or FIFO loses the data or blocks forever, and renaming over one replaces the node."""
    kind = file_kind(path)
    if kind is not None:
        name = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{name} is {kind}, not a regular file; give a path to a regular file")


_OS_FIXES = {
    errno.EROFS: "read-only file system; write elsewhere",
    errno.EACCES: "permission denied; check the permissions or write elsewhere",
    errno.EPERM: "operation not permitted; check the permissions or write elsewhere",
    errno.EIO: "input/output error (a failing disk or network mount); check the device, then rerun",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is not a folder; check the path",
    errno.EISDIR: "is a directory; give a file name",
    errno.EFBIG: "file too large for this file system; write elsewhere or split the output",
    errno.ENAMETOOLONG: "file name too long; choose a shorter one",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OS fault on ``path`` (default: the error's own file name): what
    happened and how to fix it; for a full disk or quota, the space left on that
    filesystem. Write errors carry no file name: pass the path the user gave."""
    path = exc.filename if path is None else path
    where = f"{path}: " if path is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        folder = Path(os.path.abspath(path if path is not None else tempfile.gettempdir()))
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        with contextlib.suppress(OSError):
            what += f" ({_size(shutil.disk_usage(folder).free)} free in {folder})"
        fix = "free space there or write elsewhere"
        with contextlib.suppress(ValueError, OSError):
            if folder.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
                fix += "; TMPDIR sets the temporary folder"
        return f"{where}{what}; {fix}"
    return where + _OS_FIXES.get(exc.errno, exc.strerror or str(exc))
