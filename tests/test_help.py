"""Every script's --help: at most 100 lines, each flag once in one snake_case spelling, each default
at most once, no empty defaults, examples at the end, nothing outside the repository."""

import importlib
import re

import pytest

from tests.util import SCRIPT_MODULES

SCRIPTS = ["create_batchinput", "batch_utils", "generate_data_finetuned", "reformat_results"]


def entries(help_text: str) -> list[str]:
    """The option entries of a help text: each starts at a line "  -..." and runs to the next."""
    found, current = [], None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            found.append(current)
        elif current is not None and line.startswith("    "):
            current.append(line)
        else:
            current = None
    return [" ".join(part.strip() for part in entry) for entry in found]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_each_flag_once_with_one_default(name, capsys):
    script = importlib.import_module(SCRIPT_MODULES[name])
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = script.build_parser()
    help_entries = entries(text)
    for action in parser._actions:
        if not action.option_strings or action.help == "==SUPPRESS==":
            continue
        invocation = ", ".join(action.option_strings)
        starting = [e for e in help_entries if e.startswith(invocation + " ") or e == invocation
                    or e.startswith(invocation + ",")]
        assert len([e for e in help_entries if e.split("  ")[0].split(" ")[0].rstrip(",") == action.option_strings[0]]) == 1, \
            f"{name}: {action.option_strings[0]} is not listed exactly once"
        assert starting, f"{name}: {invocation} (every alias on one line) not found"
    for entry in help_entries:
        assert entry.lower().count("(default") <= 1, f"{name}: a default shown twice: {entry}"
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
    assert re.search(r"\nexamples:\n( {4}python .*\n?)", text), f"{name}: no examples at the end of --help"
    assert text.rstrip().splitlines()[-1].startswith("    "), f"{name}: examples are not the last thing"
    assert "../" not in text and "/work/" not in text  # no path outside the repository


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_is_short_and_each_flag_has_one_snake_case_spelling(name, capsys):
    script = importlib.import_module(SCRIPT_MODULES[name])
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) <= 100, f"{name}: --help is {len(text.splitlines())} lines"
    for action in script.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert len(action.option_strings) == 1, f"{name}: {action.option_strings} has more than one spelling"
            assert "-" not in action.option_strings[0][2:], f"{name}: {action.option_strings[0]} is not snake_case"
    assert not re.search(r"^  --\w+, --", text, re.M), f"{name}: a flag listed with an alias"
