"""pyproject.toml: `pip install .` and `pip install -e .` into a fresh virtual environment give
the datagen package and the console commands, which then work from any folder.

Fast and offline: the new environment reaches the project's installed dependencies
through a .pth file (instead of downloading them), and pip runs with --no-deps
--no-build-isolation --no-index. The project is copied first, so the build leaves nothing
(build/, *.egg-info) in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.reformat_fixtures import chat_body, ok_line
from tests.util import ROOT, read_jsonl, write_jsonl

SCRIPTS = ("create_batchinput.py", "batch_utils.py", "generate_data_finetuned.py", "reformat_results.py")
COMMANDS = ("datagen-create-batchinput", "datagen-batch-utils", "datagen-generate-finetuned",
            "datagen-reformat-results", "datagen-local-batch-server", "datagen-tinymodel")


def copy_project(target: Path) -> Path:
    target.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", *SCRIPTS):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(ROOT / "datagen", target / "datagen", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def make_venv(folder: Path) -> Path:
    """A fresh venv whose python also sees this interpreter's packages (pip, setuptools,
    the dependencies) through a .pth file; returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=clean_env()).stdout.strip()
    Path(purelib, "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin"


def pip_install(bin_dir: Path, *args: str) -> None:
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", *args], capture_output=True, text=True, timeout=300,
                          env=clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def command(bin_dir: Path, name: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / name), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=clean_env())


@pytest.mark.slow
def test_pip_install_gives_the_package_and_commands_that_work_anywhere(tmp_path):
    source = copy_project(tmp_path / "src")
    bin_dir = make_venv(tmp_path / "venv")
    pip_install(bin_dir, str(source))
    assert all((bin_dir / name).is_file() for name in COMMANDS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Imported from the environment, not from the copy or the repository.
    where = command(bin_dir, "python", "-c", "import datagen.results.reformat_results as r, datagen; "
                    "print(datagen.__file__); print(r.__file__)", cwd=elsewhere)
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(tmp_path / "venv") for line in where.stdout.split())
    # Only the package lands in site-packages: no top-level modules with generic names.
    site = Path(command(bin_dir, "python", "-c", "import datagen, pathlib; print(pathlib.Path(datagen.__file__)"
                        ".parent.parent)", cwd=elsewhere).stdout.strip())
    assert not [p.name for p in site.glob("*.py")], "top-level modules installed"
    for name in ("create_batchinput", "batch_utils", "generate_data_finetuned", "reformat_results"):
        assert command(bin_dir, "python", "-c", f"import {name}", cwd=elsewhere).returncode == 1

    write_jsonl(elsewhere / "prompts.jsonl", [{"id": "a", "prompt": "Capital of France?"}])
    made = command(bin_dir, "datagen-create-batchinput", "--input_file", "prompts.jsonl", "--id_field", "id",
                   "--model_name", "gpt-4o-mini", "--output_file", "batchinput.jsonl", cwd=elsewhere)
    assert made.returncode == 0, made.stderr
    assert [line["custom_id"] for line in read_jsonl(elsewhere / "batchinput.jsonl")] == ["a"]
    write_jsonl(elsewhere / "results.jsonl", [ok_line("a", chat_body("Paris."))])
    done = command(bin_dir, "datagen-reformat-results", "--input_file", "results.jsonl", "--batch_input",
                   "batchinput.jsonl", "--output_file", "out.jsonl", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "1 ok, 0 failed, 0 missing"
    assert [r["generated_text"] for r in read_jsonl(elsewhere / "out.jsonl")] == ["Paris."]
    # The exit codes of main() come through: bad usage is 2.
    assert command(bin_dir, "datagen-batch-utils", "--no_such_flag", cwd=elsewhere).returncode == 2
    for name in ("datagen-generate-finetuned", "datagen-local-batch-server"):
        shown = command(bin_dir, name, "--help", cwd=elsewhere)
        assert shown.returncode == 0 and "usage:" in shown.stdout, shown.stderr
    served = command(bin_dir, "python", "-m", "datagen.local_batch_server", "--help", cwd=elsewhere)
    assert served.returncode == 0 and "usage: python -m datagen.local_batch_server" in served.stdout
    built = command(bin_dir, "python", "-m", "datagen.tinymodel", "tiny", "--no_adapter", cwd=elsewhere)
    assert built.returncode == 0, built.stderr
    assert (elsewhere / "tiny" / "base" / "config.json").is_file()
    for name in ("datagen.tinymodel", "datagen.batchapi.create_batchinput", "datagen.results.reformat_results"):
        shown = command(bin_dir, "python", "-m", name, "--help", cwd=elsewhere)
        assert shown.returncode == 0 and "usage:" in shown.stdout, (name, shown.stderr)
    shown = command(bin_dir, "datagen-tinymodel", "--help", cwd=elsewhere)
    assert shown.returncode == 0 and "usage: python -m datagen.tinymodel" in shown.stdout
    # The demo needs the clone (examples/ and the scripts there): one line that says so.
    demo = command(bin_dir, "python", "-m", "datagen.demo", cwd=elsewhere)
    assert demo.returncode == 1 and demo.stdout == ""
    assert demo.stderr.startswith("python -m datagen.demo: error: no examples/prompts.jsonl beside the datagen "
                                  "package (") and demo.stderr.endswith("the demo runs from a clone of the "
                                                                        "repository: make demo there\n")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["batchinput.jsonl", "out.failed.jsonl", "out.jsonl",
                                                            "prompts.jsonl", "results.jsonl", "tiny"]


@pytest.mark.slow
def test_editable_install_runs_the_source_folder(tmp_path):
    source = copy_project(tmp_path / "src")
    bin_dir = make_venv(tmp_path / "venv")
    pip_install(bin_dir, "-e", str(source))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = command(bin_dir, "python", "-c", "import datagen.results.reformat_results as r; print(r.__file__)",
                    cwd=elsewhere)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == source / "datagen" / "results" / "reformat_results.py"
    shown = command(bin_dir, "datagen-reformat-results", "--help", cwd=elsewhere)
    assert shown.returncode == 0 and "--compare" in shown.stdout, shown.stderr


# --- a Python without the requirements: one line naming the set-up command -----------------

MISSING = [  # (how it is run, its arguments, the packages it may miss first)
    ("create_batchinput.py", ["--input_file", "prompts.jsonl", "--model_name", "gpt-4o-mini"], ["tqdm"]),
    ("batch_utils.py", [], ["openai"]),
    ("reformat_results.py", ["--input_file", "results.jsonl", "--output_file", "out.jsonl"], ["tqdm"]),
    ("generate_data_finetuned.py", ["--model_name_or_path", "tiny", "--input_file", "prompts.jsonl",
                                    "--output_file", "gen.jsonl"], ["transformers", "huggingface_hub", "torch"]),
    ("-m datagen.tinymodel", ["tiny"], ["transformers"]),
    ("-m datagen.demo", ["--workdir", "demo"], ["openai"]),
]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A fresh virtual environment with nothing installed, like a system python."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    return folder / "bin" / "python"


@pytest.mark.parametrize("how,args,packages", MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_dependency_is_one_line_naming_the_setup_command(tmp_path, bare_python, how, args, packages):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    write_jsonl(tmp_path / "results.jsonl", [ok_line("request-0", chat_body("hello"))])
    before = sorted(p.name for p in tmp_path.iterdir())
    target = how.split() if how.startswith("-m") else [str(ROOT / how)]
    prog = f"python {how}" if how.startswith("-m") else how
    done = subprocess.run([str(bare_python), *target, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**clean_env(), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    package = next((p for p in packages if f"package {p!r}" in done.stderr), packages[0])
    assert done.stderr.splitlines()[-1] == (
        f"{prog}: error: the Python package {package!r} is not installed for {bare_python}: run make venv in the "
        "repository and use .venv/bin/python (or source .venv/bin/activate), or pip install -e . into this environment")
    assert len([line for line in done.stderr.splitlines() if "error:" in line]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
