"""Every command shown in the shell blocks of the README and of each docs/ page at least parses.

Scripts of the suite are parsed by their own argparse parser (every flag and value
checked, nothing run); `python -m` modules and benchmarks answer --help and know every
flag the page gives them; make targets exist; sbatch lines forward settings that
generate_data_finetuned.py's parser accepts; each block is valid bash. The README stays a
first screen (at most 20,000 bytes) that links every docs/ page, and every relative link
of every page leads to a file (or, within a page, to a heading) that exists.
"""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.util import ROOT, SCRIPT_MODULES

SUITE_SCRIPTS = ("create_batchinput.py", "batch_utils.py", "generate_data_finetuned.py", "reformat_results.py")
README = ROOT / "README.md"
README_MAX_BYTES = 20_000
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def shell_blocks(page: Path = README) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)


def commands(page: Path = README) -> list[str]:
    found = []
    for block in shell_blocks(page):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def split(command: str) -> list[str]:
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens.pop(0)
    if tokens and tokens[-1] == "&":
        tokens.pop()
    return tokens


def env_of(command: str) -> dict:
    env = {}
    for token in shlex.split(command, comments=True):
        match = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", token)
        if not match:
            break
        env[match.group(1)] = match.group(2)
    return env


def parser_of(script: str):
    return importlib.import_module(SCRIPT_MODULES[script.removesuffix(".py")]).build_parser()


def flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def test_the_readme_shows_the_two_commands_and_every_script():
    shown = commands()
    assert "make demo" in [c.split("#")[0].strip() for c in shown]
    assert "make test" in [c.split("#")[0].strip() for c in shown]
    for script in SUITE_SCRIPTS:
        assert any(script in c for c in shown), script
    assert any(c.split()[0] == "sbatch" or " sbatch " in c for c in shown)


def test_there_are_docs_pages_and_they_show_commands():
    assert DOCS, "docs/ holds no page"
    assert sum(len(commands(page)) for page in DOCS) > 0


BLOCKS = [(page_name(page), block) for page in PAGES for block in shell_blocks(page)]
COMMANDS = [(page_name(page), command) for page in PAGES for command in commands(page)]


@pytest.mark.parametrize("page,block", BLOCKS, ids=[f"{p}:{b.strip().splitlines()[0][:50]}" for p, b in BLOCKS])
def test_each_block_is_valid_bash(page, block):
    result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert result.returncode == 0, f"{page}: {result.stderr}"


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c}" for p, c in COMMANDS])
def test_each_command_parses(page, command):
    tokens = split(command)
    program = tokens[0]
    if program.endswith("python") or program.endswith("python3"):
        if tokens[1] == "-m":
            module, args = tokens[2], tokens[3:]
            help_text = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=120)
            assert help_text.returncode == 0, help_text.stderr
            for flag in flags(args):
                assert flag in help_text.stdout, f"{module} has no {flag}"
            return
        script, args = tokens[1], tokens[2:]
        if script in SUITE_SCRIPTS:
            parser_of(script).parse_args(args)  # exits with 2 on any bad flag or value
            return
        assert (ROOT / script).is_file(), script
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=120)
        assert help_text.returncode == 0, help_text.stderr
        for flag in flags(args):
            assert flag in help_text.stdout, f"{script} has no {flag}"
    elif program == "make":
        target = tokens[1] if len(tokens) > 1 and "=" not in tokens[1] else "all"
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    elif program == "sbatch":
        position = tokens.index("job_script.sh")
        forwarded = []
        for name, value in env_of(command).items():
            forwarded += [f"--{name.lower()}", value]
        parser_of("generate_data_finetuned.py").parse_args(forwarded + tokens[position + 1:])
    elif program.startswith("tests/slurm/") or program == "bash":
        script = tokens[1] if program == "bash" else program
        assert (ROOT / script).is_file(), script
    else:
        assert program in ("mkdir", "export", "(", "umask"), f"unchecked command in {page}: {command}"


def test_the_readme_is_a_first_screen_of_at_most_20000_bytes():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move the manual's text to docs/"


def links(page: Path) -> list[str]:
    """The targets of the page's markdown links, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_links_every_docs_page_and_each_link_exists():
    linked = {path for path in (target.split("#")[0] for target in links(README))
              if path.startswith("docs/") and path.endswith(".md")}
    pages = {page_name(page) for page in DOCS}
    assert linked - pages == set(), f"README.md links docs pages that do not exist: {sorted(linked - pages)}"
    assert pages - linked == set(), f"docs pages the README does not link: {sorted(pages - linked)}"


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_each_relative_link_leads_to_a_file_or_heading(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        assert where.exists(), f"{page_name(page)} links {target}, which does not exist"
        if fragment and where.suffix == ".md":
            assert fragment in anchors(where), f"{page_name(page)} links {target}: no such heading"
