"""Every command shown in the README's shell blocks at least parses.

Scripts of the suite are parsed by their own argparse parser (every flag and value
checked, nothing run); `python -m` modules and benchmarks answer --help and know every
flag the README gives them; make targets exist; sbatch lines forward settings that
generate_data_finetuned.py's parser accepts; each block is valid bash.
"""

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from tests.util import ROOT

SUITE_SCRIPTS = ("create_batchinput.py", "batch_utils.py", "generate_data_finetuned.py", "reformat_results.py")


def shell_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)


def commands() -> list[str]:
    found = []
    for block in shell_blocks():
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
    spec = importlib.util.spec_from_file_location(f"readme_{script[:-3]}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def test_the_readme_shows_the_two_commands_and_every_script():
    shown = commands()
    assert "make demo" in [c.split("#")[0].strip() for c in shown]
    assert "make test" in [c.split("#")[0].strip() for c in shown]
    for script in SUITE_SCRIPTS:
        assert any(script in c for c in shown), script
    assert any(c.split()[0] == "sbatch" or " sbatch " in c for c in shown)


@pytest.mark.parametrize("block", shell_blocks(), ids=lambda b: b.strip().splitlines()[0][:50])
def test_each_block_is_valid_bash(block):
    result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", commands())
def test_each_command_parses(command):
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
        assert program in ("mkdir", "export", "(", "umask"), f"unchecked command in the README: {command}"
