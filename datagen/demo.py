"""The main job on an embedded default: both routes end to end, offline, no API key.

    make demo                  # what the README's first command runs
    python -m datagen.demo     # the same, in an existing environment

1. builds a tiny Llama-style model and a LoRA adapter on the spot (random weights, so
   the fine-tuned answers are gibberish: the point is the plumbing, not the text);
2. OpenAI route: create_batchinput.py on examples/prompts.jsonl, then batch_utils.py
   --run --wait --download against a LOCAL STAND-IN of the Batch API started on
   127.0.0.1 (it is not OpenAI and answers "echo: <prompt>"), then reformat_results.py;
3. fine-tuned route: the same batch input through generate_data_finetuned.py, then
   reformat_results.py;
4. puts both routes side by side with ``reformat_results.py --compare`` (one row per
   request, a text and a status column per run) and prints that table.

Every step runs the real script as a subprocess and prints the command with the
interpreter that runs it (``.venv/bin/python ...``), so each line runs as printed from the
repository root. Outputs go to demo/ (created; earlier demo outputs are replaced). It
runs from a clone of the repository (it uses examples/ and the scripts there).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from datagen.common.cli import setup_hint

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = "examples/prompts.jsonl"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def python() -> str:
    """This interpreter as a user types it from the repo root: ``.venv/bin/python`` for the
    project's environment, else its full path (a bare ``python`` may lack the packages)."""
    return str(rel(Path(sys.executable)))


def sh(*args: str) -> None:
    """Run one of the suite's scripts from the repo root, echoing the command first."""
    shown = " ".join(shlex.quote(str(a)) for a in (python(), *args))
    print(f"$ {shown}", flush=True)
    started = time.time()
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT,
                            env={**os.environ, "DATAGEN_PROGRESS_INTERVAL": "5"})
    if result.returncode != 0:
        raise SystemExit(f"demo: the step above failed with exit code {result.returncode}")
    print(f"  ({time.time() - started:.1f} s)", flush=True)


def rel(path: Path) -> Path:
    """A path as a user would type it from the repo root."""
    path = Path(path)
    return path.relative_to(ROOT) if path.is_absolute() and path.is_relative_to(ROOT) else path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def cut(text, width: int) -> str:
    """One printable cell of at most ``width`` characters (random models emit odd bytes)."""
    text = "".join(c if c.isprintable() and c != "\ufffd" else "." for c in " ".join(str(text).split()))
    return text if len(text) <= width else text[: width - 1] + "~"


def show_table(path: Path, width: int = 30) -> None:
    """Print the --compare table as written (the prompt column left out, cells cut)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    shown = [i for i, name in enumerate(rows[0]) if name != "prompt"]
    for row in rows:
        print(" ".join(f"{cut(row[i], width):<{width}}" for i in shown).rstrip())


@setup_hint("python -m datagen.demo")  # a missing torch/transformers: one line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="demo", help="folder for every output (relative paths: to the repo root)")
    args = parser.parse_args(argv)
    if not (ROOT / PROMPTS).is_file():  # installed with pip: the example and scripts stay in the clone
        print(f"python -m datagen.demo: error: no {PROMPTS} beside the datagen package ({ROOT}); the demo runs "
              "from a clone of the repository: make demo there", file=sys.stderr)
        return 1
    import openai, peft, torch, transformers  # noqa: F401,E401  what the steps need, checked before any output

    from datagen.local_batch_server import LocalBatchServer
    from datagen.tinymodel import build_tiny_adapter, build_tiny_model

    work = rel(ROOT / args.workdir)
    if (ROOT / work).exists():
        shutil.rmtree(ROOT / work)
    (ROOT / work).mkdir(parents=True)
    batch_input, results = work / "batchinput.jsonl", work / "results.jsonl"
    generations = work / "generations.jsonl"
    openai_out, finetuned_out = work / "reformatted_openai.jsonl", work / "reformatted_finetuned.jsonl"
    table = work / "compare.csv"

    step("1. a tiny base model and LoRA adapter, built on the spot (random weights, nothing downloaded)")
    base = build_tiny_model(ROOT / work / "model" / "base")
    adapter = build_tiny_adapter(base, ROOT / work / "model" / "adapter")
    print(f"built {rel(base)} and {rel(adapter)}")

    step("2. OpenAI route: prompts -> batch input")
    sh("create_batchinput.py", "--input_file", PROMPTS, "--id_field", "id", "--model_name", "gpt-4o-mini",
       "--max_tokens", "24", "--output_file", batch_input)

    key = "sk-local-demo-" + secrets.token_hex(8)
    key_file = ROOT / work / "openai.tok"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    with LocalBatchServer(port=0, api_key=key, step_seconds=0.3) as server:
        step(f"3. OpenAI route: submit, wait, download, against a LOCAL STAND-IN Batch API at {server.base_url}\n"
             "   (not OpenAI: it answers 'echo: <prompt>'; for the real service drop --base_url and put your key in openai.tok)")
        sh("batch_utils.py", "--run", "--wait", "--download", results, "--file", batch_input,
           "--base_url", server.base_url, "--key_file", rel(key_file),
           "--ids_file", work / "last_batch_id.tok", "--poll_interval", "1", "--description", "datagen demo",
           "--cache_dir", work / "cache")

    step("4. OpenAI route: raw results -> {id, generated_text}")
    sh("reformat_results.py", "--input_file", results, "--output_file", openai_out,
       "--batch_input", batch_input)

    step("5. fine-tuned route: the same batch input through the base model + LoRA adapter")
    sh("generate_data_finetuned.py", "--model_name_or_path", rel(base),
       "--adapter_path", rel(adapter), "--input_file", batch_input,
       "--output_file", generations, "--batch_size", "4", "--cache_dir", work / "cache")

    step("6. fine-tuned route: generations -> {id, generated_text}")
    sh("reformat_results.py", "--input_file", generations, "--output_file", finetuned_out,
       "--batch_input", batch_input)

    step("7. both routes side by side: one row per request, one column per run, joined on custom_id")
    sh("reformat_results.py", "--compare", results, generations, "--batch_input", batch_input,
       "--output_file", table)
    show_table(ROOT / table)

    requests = len(read_jsonl(ROOT / batch_input))
    print(textwrap.dedent(f"""
        summary
          create_batchinput.py        {PROMPTS} -> {batch_input}: {requests} requests
          batch_utils.py              uploaded, waited, downloaded {len(read_jsonl(ROOT / results))} result lines -> {results}
          reformat_results.py         {results} -> {openai_out}: {len(read_jsonl(ROOT / openai_out))} lines
          generate_data_finetuned.py  {batch_input} -> {generations}: {len(read_jsonl(ROOT / generations))} lines
          reformat_results.py         {generations} -> {finetuned_out}: {len(read_jsonl(ROOT / finetuned_out))} lines
          reformat_results.py         --compare {results} {generations} -> {table}
        Everything is in {work}/. Next: the README's recipe for real OpenAI use, and the manual in docs/ (one page per script).""").rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
