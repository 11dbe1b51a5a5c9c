"""Inspect, clear and compact an answer cache folder (``python -m datagen.cache``).

- ``namespaces(root)``: the namespaces a folder holds, each with its entries (lines; a key
  put twice counts twice), bytes, segments and the dates of its oldest and newest entries.
- ``clear(root, namespace=None)``: removes the cache's own files only (segments and the
  name file), so a ``--cache_dir`` pointed at the wrong folder never loses anything else.
- ``compact(root, namespace=None)``: merges a namespace's finished segments into one,
  keeping the newest entry of each key (the one lookups find). A segment is finished when its writer closed it
  (``#closed``), when its writer ran on this host and its process is gone, or when it is
  untouched for ``stale_hours`` (a writer on another node that died). Segments still being
  written are left alone, so compaction is safe while runs write. Memory: one set of the
  merged keys (about 100 bytes a key).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from datagen.cache.segments import (CLOSED, READ_SIZE, created, is_closed, is_entry, list_segments, scan,
                                    segment_name, writer_gone)
from datagen.cache.keys import namespace_folder
from datagen.cache.store import META
from datagen.common.jsonl import loads

STALE_HOURS = 24.0


@dataclass
class NamespaceInfo:
    namespace: str
    folder: Path
    entries: int = 0
    bytes: int = 0
    segments: int = 0
    oldest: float | None = None  # seconds since the epoch
    newest: float | None = None


def _name_of(folder: Path) -> str | None:
    """The namespace a folder holds; None when it is not one of the cache's own folders (no
    name file, or a name that does not give this folder's name): such a folder is never
    listed, cleared or compacted, whatever files it holds."""
    try:
        name = str(loads((folder / META).read_bytes())["namespace"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if namespace_folder(name) == folder.name else None


def _segments(folder: Path) -> list[Path]:
    """The folder's segments: files named as the cache names them (time, host, pid, token)."""
    return [path for path in list_segments(folder) if created(path) is not None]


def _count_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(READ_SIZE):
            lines += block.count(b"\n")
    return lines - is_closed(path)


def namespaces(root: Path, only: str | None = None) -> list[NamespaceInfo]:
    """Every namespace in ``root`` (or the one named ``only``), by name."""
    found = []
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        name = _name_of(folder)
        if name is None or (only is not None and only not in (name, folder.name)):
            continue
        info = NamespaceInfo(name, folder)
        for segment in _segments(folder):
            with contextlib.suppress(FileNotFoundError):  # compacted meanwhile
                stat = segment.stat()
                info.entries += _count_lines(segment)
                info.bytes += stat.st_size
                info.segments += 1
                born = created(segment) or stat.st_mtime
                info.oldest = born if info.oldest is None else min(info.oldest, born)
                info.newest = stat.st_mtime if info.newest is None else max(info.newest, stat.st_mtime)
        found.append(info)
    return sorted(found, key=lambda info: info.namespace)


def clear(root: Path, only: str | None = None) -> list[NamespaceInfo]:
    """Remove every namespace (or the one named ``only``); returns what was removed."""
    removed = namespaces(root, only)
    for info in removed:
        for path in _segments(info.folder) + [info.folder / META]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for path in [*info.folder.glob(".namespace-*.tmp"), *info.folder.glob(".compact-*.tmp")]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):  # a writer began a new segment meanwhile: the folder stays
            info.folder.rmdir()
    return removed


@dataclass
class Compacted:
    namespace: str
    merged: int  # segments merged into one
    kept: int  # entries kept
    dropped: int  # duplicate keys and damaged lines dropped


def compact(root: Path, only: str | None = None, stale_hours: float = STALE_HOURS) -> list[Compacted]:
    """Merge each namespace's finished segments into one (see the module's docstring)."""
    done = []
    for info in namespaces(root, only):
        segments = [s for s in _segments(info.folder) if _finished(s, stale_hours)]
        if len(segments) < 2:
            continue
        done.append(_merge(info, segments))
    return done


def _finished(segment: Path, stale_hours: float) -> bool:
    try:
        return writer_gone(segment, stale_hours * 3600)
    except FileNotFoundError:
        return False


def _merge(info: NamespaceInfo, segments: list[Path]) -> Compacted:
    """Write the merged segment under a hidden name, rename it into place (named to sort
    where the newest merged one did), then remove the merged ones. A kill at any point
    leaves at most duplicates, which the newest-entry rule and the next compaction absorb."""
    tmp = info.folder / f".compact-{secrets.token_hex(6)}.tmp"
    seen: set[bytes] = set()
    merged, kept, dropped = [], 0, 0
    try:
        with open(tmp, "wb", buffering=READ_SIZE) as out:
            for segment in reversed(segments):  # the newest first: its entries win
                try:
                    for _, line in scan(segment):
                        if not is_entry(line) or line[:64] in seen:
                            dropped += not line.startswith(b"#")
                            continue
                        seen.add(line[:64])
                        out.write(line + b"\n")
                        kept += 1
                except FileNotFoundError:  # compacted or cleared by another process meanwhile
                    continue
                merged.append(segment)
            out.write(CLOSED)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, info.folder / segment_name(created(segments[-1])))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    for segment in merged:
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
    return Compacted(info.namespace, len(merged), kept, dropped)
