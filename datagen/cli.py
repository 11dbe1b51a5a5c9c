"""Shared command-line plumbing: the ``main()`` wrapper, logging, progress bars, flags.

Every script does the same three things: parse, call the package, report. This module
holds what they share so that each flag and each convention has one home:

- ``run(parser, body, argv)``: parse ``argv``, set up logging, call ``body(args)``;
  a ``UserError`` becomes one line on stderr and exit code 1, Ctrl+C exit code 130.
- ``add_flag(group, "input_file", ...)``: defines ``--input_file`` and its kebab-case
  alias ``--input-file`` together.
- ``progress(...)``: a tqdm bar that redraws in place on a terminal and prints one
  plain line per update (every 30 s by default) when stderr is a file, as in a SLURM log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from datagen.errors import UserError

log = logging.getLogger("datagen")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's example commands as written; each flag's aliases and metavar
    once (``--input_file, --input-file PATH``); a default shown once, and only when it says
    something (not None, not off, not one the help text already states)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or "%(default)" in text or action.required or default is None
                or default is False or default is argparse.SUPPRESS or default == [] or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _split_examples(doc: str) -> tuple[str, str | None]:
    """A script docstring's indented example commands go to the end of --help."""
    lines = doc.strip("\n").splitlines()
    examples, rest = [], []
    for line in lines:
        starts = line.startswith("    ") and line.strip().split(" ", 1)[0] in ("python", "sbatch", "bash")
        continues = line.startswith("        ") and examples and examples[-1].rstrip().endswith("\\")
        (examples if starts or continues else rest).append(line)
    if not examples:
        return doc, None
    description = "\n".join(rest).strip("\n")
    while "\n\n\n" in description:
        description = description.replace("\n\n\n", "\n\n")
    return description, "examples:\n" + "\n".join(examples)


def make_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring, its example commands last."""
    description, epilog = _split_examples(doc) if doc else (None, None)
    # allow_abbrev=False: a typo like --output_fil must fail, not silently match a flag.
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def add_flag(group, name: str, *more: str, **kwargs) -> argparse.Action:
    """Add ``--name`` plus its kebab-case alias (``--input_file`` and ``--input-file``)."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    flags.extend(more)
    return group.add_argument(*flags, **kwargs)


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    add_flag(group, "log_level", default=os.environ.get("DATAGEN_LOG_LEVEL", "INFO"),
             choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
             help="how much to log on stderr (env DATAGEN_LOG_LEVEL)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: str = "INFO") -> None:
    """Log the suite's own messages (logger ``datagen`` and its children) on stderr."""
    logger = logging.getLogger("datagen")
    logger.setLevel(getattr(logging, level, logging.INFO))
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
        argv: Sequence[str] | None = None) -> int:
    """Parse, run ``body``, and turn expected failures into one line and an exit code.

    0 done; 1 a runtime, input or API problem (one line on stderr); 2 bad usage
    (argparse exits itself); 130 interrupted by Ctrl+C.
    """
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        status = body(args)
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


# --- files -------------------------------------------------------------------------


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
    """Refuse an output path that is one of the inputs or sits in a missing folder."""
    output = Path(output)
    for path in inputs:
        if same_file(output, path):
            raise UserError(
                f"{flag} {output} is the same file as the input {path}; "
                "choose another output path (the input would be overwritten)"
            )
    if output.is_dir():
        raise UserError(f"{flag} {output} is a directory; give a file name")
    parent = output.parent
    if not parent.exists():
        raise UserError(f"{flag} {output}: folder {parent} does not exist; create it first")
    return output


# --- progress ------------------------------------------------------------------------


class _LineStream:
    """A file-like object for tqdm that turns carriage-return redraws into plain lines."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "").strip()
        if text and text != self.last:  # tqdm redraws the final state on close
            self.last = text
            self.stream.write(text + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs):
    """A tqdm progress bar that reads well both on a terminal and in a SLURM log file.

    On a terminal it redraws in place. When stderr is a file it prints one line per
    update at most every ``DATAGEN_PROGRESS_INTERVAL`` seconds (default 30). Set
    ``TQDM_DISABLE=1`` to turn bars off.
    """
    from tqdm import tqdm

    stream = sys.stderr
    if not stream.isatty():
        interval = float(os.environ.get("DATAGEN_PROGRESS_INTERVAL", "30"))
        kwargs.setdefault("mininterval", interval)
        kwargs.setdefault("maxinterval", max(interval, 10.0))
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("delay", min(interval, 5.0))  # short steps print no bar at all
        stream = _LineStream(stream)
    if os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        kwargs["disable"] = True
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=False, **kwargs)
