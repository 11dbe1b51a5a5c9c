"""Inspect, clear or compact the answer cache (where both routes keep their answers).

    python -m datagen.cache                               # the folder; per model: entries, size, dates
    python -m datagen.cache --clear --model gpt-4o-mini   # forget one model's answers
    python -m datagen.cache --clear                       # forget everything
    python -m datagen.cache --compact                     # merge finished segments, one entry per key

The folder: --cache_dir, else $DATAGEN_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/datagen/answers.
A model is a namespace: an OpenAI model name, or a fine-tuned MODEL+ADAPTER. Everything
else: docs/cache.md.
"""

from __future__ import annotations

import sys
import time

from datagen.cache import maintenance
from datagen.cache.config import ENV, check_cache_dir, resolve_cache_dir
from datagen.common import cli
from datagen.common.errors import UserError


def build_parser():
    parser = cli.make_parser(__doc__, prog="python -m datagen.cache")
    group = parser.add_argument_group("what to do (one)")
    action = group.add_mutually_exclusive_group()
    cli.add_flag(action, "info", action="store_true", help="show the cache: the default")
    cli.add_flag(action, "clear", action="store_true", help="remove all entries, or one model's with --model")
    cli.add_flag(action, "compact", action="store_true",
                 help="merge each model's finished segments into one, keeping one entry per key")
    options = parser.add_argument_group("which cache, which model")
    cli.add_flag(options, "cache_dir", help=f"the cache's folder (default: ${ENV}, else "
                 "${XDG_CACHE_HOME:-~/.cache}/datagen/answers)")
    cli.add_flag(options, "model", help="only this model (namespace), as --info lists it")
    cli.add_logging_args(parser)
    return parser


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(seconds)) if seconds is not None else "-"


def _select(root, model: str | None) -> list[maintenance.NamespaceInfo]:
    infos = maintenance.namespaces(root, model)
    if model is not None and not infos:
        known = ", ".join(info.namespace for info in maintenance.namespaces(root)[:10]) or "none"
        raise UserError(f"no model {model!r} in the answer cache {root} (models: {known}); "
                        "python -m datagen.cache lists them")
    return infos


def info(root, model: str | None) -> None:
    print(f"answer cache: {root}")
    infos = _select(root, model) if root.is_dir() else []
    if not infos:
        print("empty")
        return
    print(f"{'entries':>10}  {'size':>9}  {'segments':>8}  {'oldest (UTC)':<16}  {'newest (UTC)':<16}  model")
    for item in infos:
        print(f"{item.entries:>10,}  {_size(item.bytes):>9}  {item.segments:>8,}  {_when(item.oldest):<16}  "
              f"{_when(item.newest):<16}  {item.namespace}")
    print(f"{len(infos)} model(s), {sum(i.entries for i in infos):,} entries, {_size(sum(i.bytes for i in infos))}")


def run_command(args) -> int:
    root = check_cache_dir(resolve_cache_dir(args.cache_dir), create=False)
    if args.clear:
        if args.model is not None:
            _select(root, args.model)  # an unknown model is an error, not "cleared 0"
        removed = maintenance.clear(root, args.model)
        for item in removed:
            print(f"removed {item.namespace}: {item.entries:,} entries, {_size(item.bytes)}")
        print(f"cleared {len(removed)} model(s) from {root}")
    elif args.compact:
        if args.model is not None:
            _select(root, args.model)
        done = maintenance.compact(root, args.model)
        for item in done:
            print(f"compacted {item.namespace}: {item.merged} segments into one, {item.kept:,} entries kept, "
                  f"{item.dropped:,} duplicates or damaged lines dropped")
        print(f"compacted {len(done)} model(s) in {root}")
    else:
        info(root, args.model)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return cli.run(parser, run_command, argv)


if __name__ == "__main__":
    sys.exit(main())
