"""Shared command-line plumbing: the ``main()`` wrapper, logging, progress bars, flags.

Every script does the same three things: parse, call the package, report. This module
holds what they share so that each flag and each convention has one home:

- ``run(parser, body, argv)``: parse ``argv``, set up logging, call ``body(args)``;
  a ``UserError`` (or a stray ``OSError``, or a dependency not installed: ``setup_hint``)
  becomes one line on stderr and exit code 1;
  SIGTERM raises ``Terminated`` and exits 143, Ctrl+C (SIGINT) exits 130, each with one
  line saying what was kept (``set_interrupt_hint``).
- ``held_signals()``: a short block (create a file and record it; rename parts into
  place) that a signal cannot cut in two.
- ``describe_os_error`` / ``refuse_non_regular``: disk full, permissions, device nodes
  as one line that names the path and says how to fix it.
- ``add_flag(group, "input_file", ...)``: defines ``--input_file`` (one spelling, snake_case)
  and marks a flag whose value may start with "-".
- ``number(minimum, maximum)``: the argparse ``type=`` of every float flag; nan and
  inf are refused (exit 2, naming the flag), so no guard compares against them.
- ``progress(...)``: a tqdm bar that redraws in place on a terminal and prints one
  plain line per update (every 30 s by default) when stderr is a file, as in a SLURM log.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from datagen.errors import UserError

log = logging.getLogger("datagen")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's example commands as written; each flag's metavar once
    (``--input_file PATH``); a default shown once, and only when it says
    something (not None, not off, not one the help text already states)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        return f"{', '.join(action.option_strings)} {self._format_args(action, self._get_default_metavar_for_optional(action))}"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        # The last word of the name (--input_file FILE, --batch_size SIZE) keeps most flags on one line.
        return action.dest.rsplit("_", 1)[-1].upper()

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


def make_parser(doc: str | None, prog: str | None = None, usage: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring, its example commands last;
    ``usage``: a short usage line (argparse's own lists every flag)."""
    description, epilog = _split_examples(doc) if doc else (None, None)
    # allow_abbrev=False: a typo like --output_fil must fail, not silently match a flag.
    return argparse.ArgumentParser(prog=prog, usage=usage, description=description, epilog=epilog,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def add_flag(group, name: str, *, dash_value: bool = False, **kwargs) -> argparse.Action:
    """Add ``--name`` (``--input_file``): each flag has one spelling, in snake_case.

    ``dash_value``: the value may start with "-" (``--stop '---'``), which argparse alone
    takes for a flag; ``run`` passes such a value on as ``--stop=---``.
    """
    action = group.add_argument(f"--{name}", **kwargs)
    action.dash_value = dash_value
    return action


def number(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type=`` for a float flag: a finite number within the bounds given.
    ``nan`` compares false with everything, so a guard like ``cost > --max_cost`` would
    silently pass; ``inf`` is no bound either. argparse names the flag in the message."""
    if minimum is not None and maximum is not None:
        wanted = f"give a number from {minimum:g} to {maximum:g}"
    elif minimum is not None:
        wanted = f"give a number of {minimum:g} or more"
    elif maximum is not None:
        wanted = f"give a number of {maximum:g} or less"
    else:
        wanted = "give a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {wanted}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; {wanted}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{text} is out of range; {wanted}")
        return value

    parse.__name__ = "number"  # argparse names the type in some messages
    return parse


def glue_dash_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--stop -x`` into ``--stop=-x`` for flags whose value may start with "-", unless
    the next word is itself one of the parser's flags (then argparse reports the missing value)."""
    glued = {flag for action in parser._actions if getattr(action, "dash_value", False)
             for flag in action.option_strings}
    known = {flag for action in parser._actions for flag in action.option_strings}
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            out.extend(words[i:])
            break
        following = words[i + 1] if i + 1 < len(words) else None
        if word in glued and following is not None and following.startswith("-") \
                and following.split("=", 1)[0] not in known:
            out.append(f"{word}={following}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


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


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (``kill``, ``scancel``, a SLURM time limit).

    Like ``KeyboardInterrupt`` it is not an ``Exception``: ``except Exception`` lets it
    through, while every ``finally``, ``except BaseException`` and ``with`` block still runs
    its cleanup on the way out.
    """


DEFAULT_HINT = "no output written"
_hint: "str | Callable[[], str]" = DEFAULT_HINT
_held = 0  # > 0 inside held_signals()
_pending: BaseException | None = None  # a signal that arrived while held
_stopping = False  # a signal was raised already: later ones must not cut its cleanup short


def set_interrupt_hint(hint: "str | Callable[[], str] | None") -> None:
    """Set what the line printed on SIGTERM / Ctrl+C says after "terminated by SIGTERM; ".

    A text, or a function called only when the signal comes (for counts that change
    per record). ``None`` restores the default, "no output written". ``run`` resets it
    at its start and restores the caller's at its end.
    """
    global _hint
    _hint = DEFAULT_HINT if hint is None else hint


def _hint_text() -> str:
    try:
        return str(_hint() if callable(_hint) else _hint)
    except Exception:  # the hint must never hide the message it belongs to
        return DEFAULT_HINT


def _on_signal(signum, frame) -> None:
    global _pending, _stopping
    if _stopping:
        log.warning("already stopping (signal %d); cleaning up", signum)
        return
    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if _held:
        _pending = _pending or exc
        return
    _stopping = True
    raise exc


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Run a short block whole: SIGTERM / SIGINT arriving inside it is raised at its end.

    For steps that must not be cut apart: create a temporary file and record it for
    cleanup; rename several parts into place. Only signals handled by ``run`` wait
    (elsewhere, and outside the main thread, this does nothing). Keep blocks short.
    """
    global _held, _pending, _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            exc, _pending, _stopping = _pending, None, True
            raise exc


def _install_signal_handlers() -> dict:
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt; returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        old = signal.getsignal(signum)
        if old is signal.SIG_IGN:  # ignored on purpose by whoever started us (nohup, `cmd &`)
            continue
        signal.signal(signum, _on_signal)
        previous[signum] = signal.SIG_DFL if old is None else old
    return previous


# Third-party packages by the set-up that installs them (requirements*.txt, Makefile targets).
VENV_HINT = "in the repository and use .venv/bin/python (or source .venv/bin/activate)"
SETUP_COMMANDS = {
    f"run make venv {VENV_HINT}, or pip install -e . into this environment": (
        "torch", "transformers", "peft", "openai", "accelerate", "datasets", "numpy", "tqdm", "orjson",
        "pyarrow", "safetensors", "tokenizers", "huggingface_hub", "httpx"),
    f"run make vllm (the vLLM engine) {VENV_HINT}": ("vllm",),
    f"run make dev (the test tools) {VENV_HINT}": ("pytest", "jsonschema"),
}


def missing_dependency(exc: ModuleNotFoundError) -> str | None:
    """One line for a third-party package that is not installed, naming the set-up command
    that installs it; None for any other missing module (that is a bug, with its traceback)."""
    name = (exc.name or "").partition(".")[0]
    setup = next((command for command, names in SETUP_COMMANDS.items() if name in names), None)
    if setup is None:
        return None
    return f"the Python package {name!r} is not installed for {sys.executable}: {setup}"


@contextlib.contextmanager
def setup_hint(prog: str) -> Iterator[None]:
    """For ``python -m`` entry points (also as a decorator of ``main``): a missing
    third-party package inside is one line on stderr and exit code 1, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        message = missing_dependency(exc)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
        argv: Sequence[str] | None = None) -> int:
    """Parse, run ``body``, and turn expected failures into one line and an exit code.

    0 done; 1 a runtime, input or API problem, or an OS fault (one line on stderr);
    2 bad usage (argparse exits itself); 143 SIGTERM; 130 SIGINT (Ctrl+C). The signal
    handlers and the interrupt hint in place before the call are restored after it.
    """
    global _hint, _pending, _stopping
    args = parser.parse_args(glue_dash_values(parser, sys.argv[1:] if argv is None else argv))
    setup_logging(getattr(args, "log_level", "INFO"))
    saved_hint, _hint, _pending, _stopping = _hint, DEFAULT_HINT, None, False
    previous = _install_signal_handlers()
    try:
        status = body(args)
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"{parser.prog}: terminated by SIGTERM; {_hint_text()}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted by SIGINT (Ctrl+C); {_hint_text()}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # a dependency not installed: which set-up command installs it
        message = missing_dependency(exc)
        if message is None:
            raise
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    except OSError as exc:  # a fault no helper named (they raise UserError): still one line
        print(f"{parser.prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _hint, _pending, _stopping = saved_hint, None, False
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
