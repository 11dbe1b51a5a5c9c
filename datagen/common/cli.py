"""Shared command-line plumbing: the ``main()`` wrapper, logging, progress bars, flags.

Every script does the same three things: parse, call the package, report. This module
holds what they share so that each flag and each convention has one home:

- ``run(parser, body, argv)``: parse ``argv``, set up logging, call ``body(args)``;
  a ``UserError`` (or a stray ``OSError``, or a dependency not installed: ``setup_hint``)
  becomes one line on stderr and exit code 1;
  SIGTERM raises ``Terminated`` and exits 143, Ctrl+C (SIGINT) exits 130, each with one
  line saying what was kept (``set_interrupt_hint``).
- signals (``held_signals``, ``Terminated``) live in ``signals.py``; paths and OS faults
  (``describe_os_error``, ``check_output_path``) in ``files.py``; both are used through here too.
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
import logging
import math
import os
import sys
from typing import Callable, Iterator, Sequence

from datagen.common import signals
from datagen.common.errors import UserError
# Re-exported: the scripts and modules reach these through cli (their home is named).
from datagen.common.files import (check_output_path, describe_os_error, file_kind,  # noqa: F401
                                  refuse_non_regular, same_file)
from datagen.common.signals import Terminated, held_signals, set_interrupt_hint  # noqa: F401

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
    args = parser.parse_args(glue_dash_values(parser, sys.argv[1:] if argv is None else argv))
    setup_logging(getattr(args, "log_level", "INFO"))
    saved = signals.install()
    try:
        status = body(args)
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"{parser.prog}: terminated by SIGTERM; {signals.hint_text()}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted by SIGINT (Ctrl+C); {signals.hint_text()}", file=sys.stderr)
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
        signals.restore(saved)
    return int(status or 0)


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
