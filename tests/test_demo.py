"""The README's first command: both routes end to end, offline, on the bundled example."""

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tests.util import ROOT, read_jsonl


def test_demo_runs_both_routes_end_to_end(tmp_path):
    work = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "datagen.demo", "--workdir", str(work)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prompts = [json.loads(line) for line in (ROOT / "examples/prompts.jsonl").read_text().splitlines()]
    ids = [p["id"] for p in prompts]
    openai_rows = read_jsonl(work / "reformatted_openai.jsonl")
    finetuned_rows = read_jsonl(work / "reformatted_finetuned.jsonl")
    # Both routes answered every prompt, in the prompts' order, under the same ids.
    assert [r["id"] for r in openai_rows] == ids
    assert [r["id"] for r in finetuned_rows] == ids
    assert {r["source"] for r in openai_rows} == {"openai"}
    assert {r["source"] for r in finetuned_rows} == {"finetuned"}
    # The stand-in echoes the last user message, so the OpenAI route's text is known.
    for prompt, row in zip(prompts, openai_rows):
        last = prompt["prompt"] if "prompt" in prompt else prompt["messages"][-1]["content"]
        assert row["generated_text"] == f"echo: {last}"
    assert all(r["adapter"] for r in finetuned_rows)
    out = result.stdout
    assert "LOCAL STAND-IN" in out
    # Each command is printed with the interpreter that runs it, relative to the repo root.
    python = os.path.relpath(sys.executable, ROOT) if Path(sys.executable).is_relative_to(ROOT) else sys.executable
    assert f"$ {python} create_batchinput.py" in out and f"$ {python} generate_data_finetuned.py" in out
    assert "summary" in out and f"-> {work}/batchinput.jsonl: {len(ids)} requests" in out
    # The demo ends with the --compare table: a row per request, a text and status column per run.
    compare_line = next(line for line in out.splitlines() if line.startswith(f"$ {python} reformat_results.py --compare"))
    with open(work / "compare.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["id"] for row in table] == ids
    openai_name = openai_rows[0]["model"]
    adapter_name = (work / "model" / "adapter").name
    assert list(table[0]) == ["id", "prompt", openai_name, f"{openai_name}.status", adapter_name,
                              f"{adapter_name}.status"]
    assert [row[openai_name] for row in table] == [r["generated_text"] for r in openai_rows]
    assert {row[f"{adapter_name}.status"] for row in table} == {"ok"}
    shown = out[out.index("both routes side by side"):out.index("summary")]
    assert all(i[:16] in shown for i in ids)
    # A printed line runs as printed from the repository root, in a plain shell.
    (work / "compare.csv").unlink()
    again = subprocess.run(compare_line[2:], shell=True, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")})
    assert again.returncode == 0, again.stderr
    with open(work / "compare.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle)) == table


def help_examples(script: str) -> list[list[str]]:
    """The example commands at the end of a script's --help, as argument lists."""
    text = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True,
                          check=True).stdout
    commands, current = [], ""
    for line in text[text.index("\nexamples:\n"):].splitlines()[2:]:
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(shlex.split(current, comments=True))
        current = ""
    return commands


def test_help_examples_run_as_printed_after_make_demo(tmp_path):
    """In a folder holding examples/ and what make demo wrote (demo/), every example of
    create_batchinput.py, generate_data_finetuned.py and reformat_results.py runs as printed
    (batch_utils.py's need the API: they are checked by their parser in test_help)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    demo = subprocess.run([sys.executable, "-m", "datagen.demo", "--workdir", str(tmp_path / "demo")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    ran = 0
    for script in ("create_batchinput", "generate_data_finetuned", "reformat_results"):
        for command in help_examples(script):
            assert command[:2] == ["python", f"{script}.py"], command
            done = subprocess.run([sys.executable, str(ROOT / command[1]), *command[2:]], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, (command, done.stderr[-3000:])
            ran += 1
    assert ran >= 9
    assert (tmp_path / "generations.jsonl").is_file() and (tmp_path / "table.csv").is_file()
