"""Where the answer cache lives and the flags that turn it off, shared by both routes.

    group = add_cache_args(parser)        # --cache_dir, --no_cache, --refresh_cache
    cache = open_cache(args)              # AnswerCache, or None with --no_cache

The folder: ``--cache_dir`` > ``$DATAGEN_CACHE_DIR`` > ``${XDG_CACHE_HOME:-~/.cache}/datagen/answers``
(one per user; point it at a shared filesystem to share it between nodes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from datagen.cache.store import AnswerCache
from datagen.common import cli
from datagen.common.errors import UserError

ENV = "DATAGEN_CACHE_DIR"
FIX = f"choose another folder with --cache_dir (or {ENV}), or run with --no_cache"


def resolve_cache_dir(flag: str | os.PathLike | None = None) -> Path:
    """``flag``, else ``$DATAGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/datagen/answers``
    (an unset, empty or relative ``XDG_CACHE_HOME`` means ``~/.cache``, as the XDG spec says)."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "datagen" / "answers"


def check_cache_dir(path: Path, create: bool = True) -> Path:
    """``path`` as a usable cache folder (created, and tried with a file when ``create``);
    otherwise one ``UserError`` line saying what is wrong and how to go on."""
    if path.exists() and not path.is_dir():
        raise UserError(f"answer cache {path} is not a folder; {FIX}")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)  # permissions, read-only, full: now, not later
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"answer cache {cli.describe_os_error(exc, path)}; {FIX}") from None
    return path


def add_cache_args(parser: argparse.ArgumentParser):
    """The "answer cache" flags; returns the group."""
    group = parser.add_argument_group("answer cache")
    cli.add_flag(group, "cache_dir", help=f"the answer cache's folder (default: ${ENV}, else "
                 "${XDG_CACHE_HOME:-~/.cache}/datagen/answers)")
    switch = group.add_mutually_exclusive_group()
    cli.add_flag(switch, "no_cache", action="store_true",
                 help="neither read nor write the answer cache: every request is answered anew")
    cli.add_flag(switch, "refresh_cache", action="store_true",
                 help="do not read the answer cache (answer every request anew); the new answers replace the old")
    return group


def open_cache(args: argparse.Namespace) -> AnswerCache | None:
    """The cache the flags ask for: None with --no_cache; with --refresh_cache one that
    finds nothing and keeps every new answer."""
    if getattr(args, "no_cache", False):
        return None
    root = check_cache_dir(resolve_cache_dir(getattr(args, "cache_dir", None)))
    return AnswerCache(root, read=not getattr(args, "refresh_cache", False), write=True)
