"""Signals for every command: SIGTERM raises ``Terminated``, Ctrl+C ``KeyboardInterrupt``,
and a short block that must not be cut in two (``held_signals``) receives them at its end.

``cli.run`` installs the handlers (``install``) and restores them (``restore``); the line
it prints on a signal ends with the hint set by ``set_interrupt_hint`` (what was kept).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator

log = logging.getLogger("datagen")


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


def install() -> tuple:
    """Handlers on, hint reset; returns what ``restore`` needs to put back."""
    global _hint, _pending, _stopping
    saved = (_hint, _install_signal_handlers())
    _hint, _pending, _stopping = DEFAULT_HINT, None, False
    return saved


def restore(saved: tuple) -> None:
    global _hint, _pending, _stopping
    hint, previous = saved
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _hint, _pending, _stopping = hint, None, False


def hint_text() -> str:
    """The hint as printed after "terminated by SIGTERM; "."""
    return _hint_text()
