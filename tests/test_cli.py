"""The shared command-line plumbing: progress bars in log files, the main wrapper."""

import pytest

from datagen.cli import make_parser, run
from datagen.errors import UserError


def test_progress_in_a_log_file_prints_plain_lines_once(monkeypatch, capsys):
    from datagen.cli import progress

    monkeypatch.setenv("DATAGEN_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for _ in progress(range(3), desc="rows", unit="row", delay=0):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert lines[-1].startswith("rows: 100%") and "3/3" in lines[-1]
    assert len(lines) == len(set(lines))  # the final state is not printed twice


def test_run_turns_a_user_error_into_one_line_and_exit_1(capsys):
    def body(args):
        raise UserError("bad thing\nspread over lines; fix it")

    assert run(make_parser("doc", prog="tool.py"), body, []) == 1
    assert capsys.readouterr().err == "tool.py: error: bad thing spread over lines; fix it\n"


def test_run_keeps_the_traceback_of_a_bug():
    def body(args):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        run(make_parser("doc", prog="tool.py"), body, [])
