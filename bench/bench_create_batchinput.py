#!/usr/bin/env python3
"""Benchmark create_batchinput.py against a jq one-liner on a large prompts file.

    .venv/bin/python bench/bench_create_batchinput.py                  # 1,000,000 prompts
    .venv/bin/python bench/bench_create_batchinput.py --lines 20000    # a quick run

Generates a JSONL prompts file ({"id", "prompt", "topic"} rows, prompts of 5 to 120
words), then times, side by side in one run:

- ``create_batchinput.py --input_file prompts.jsonl --id_field id --model_name gpt-4o-mini``
  (checks every row and id, splits into 50,000-request parts, writes atomically);
- ``jq -c '{custom_id: .id, method: "POST", url: "/v1/chat/completions", body: {model:
  "gpt-4o-mini", messages: [{role: "user", content: .prompt}]}}'``: the same lines, in one
  file, with no checks.

Prints wall time, the ratio, the peak RSS of each command, and whether both wrote the
same requests (parsed line by line). Files go to ``bench/out/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reformat import ROOT, WORDS, timed  # noqa: E402

JQ_FILTER = ('{custom_id: .id, method: "POST", url: "/v1/chat/completions", '
             'body: {model: "gpt-4o-mini", messages: [{role: "user", content: .prompt}]}}')


def generate(path: Path, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(lines):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))
            handle.write(json.dumps({"id": f"q-{index}", "prompt": prompt, "topic": rng.choice(("a", "b", "c"))},
                                    ensure_ascii=False) + "\n")


def same_requests(ours: list[Path], jq_out: Path) -> bool:
    with open(jq_out, encoding="utf-8") as theirs:
        for part in ours:
            with open(part, encoding="utf-8") as mine:
                for line in mine:
                    if json.loads(line) != json.loads(theirs.readline()):
                        return False
        return theirs.readline() == ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="prompts to generate")
    parser.add_argument("--work_dir", default=str(ROOT / "bench" / "out" / "create_batchinput"),
                        help="where the generated files go")
    parser.add_argument("--jq", default=shutil.which("jq") or "/usr/bin/jq", help="jq binary")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    if work.exists():
        shutil.rmtree(work)
    (work / "ours").mkdir(parents=True)
    prompts = work / "prompts.jsonl"
    started = time.perf_counter()
    generate(prompts, args.lines)
    print(f"generated {args.lines:,} prompts ({prompts.stat().st_size / 1e6:,.0f} MB) in "
          f"{time.perf_counter() - started:.1f} s under {work}")

    os.environ["TQDM_DISABLE"] = "1"
    ours = [sys.executable, str(ROOT / "create_batchinput.py"), "--input_file", str(prompts), "--id_field", "id",
            "--model_name", "gpt-4o-mini", "--output_file", str(work / "ours" / "batchinput.jsonl"),
            "--log_level", "WARNING"]
    jq_wall, jq_cpu, jq_rss = timed([args.jq, "-c", JQ_FILTER, str(prompts)], work / "jq.jsonl")
    print(f"  {'jq one-liner (no checks, one file)':<36} {jq_wall:8.2f} s wall {jq_cpu:8.2f} s CPU   "
          f"peak RSS {jq_rss:8.1f} MiB", flush=True)
    our_wall, our_cpu, our_rss = timed(ours, work / "ours.stdout")
    print(f"  {'create_batchinput.py':<36} {our_wall:8.2f} s wall {our_cpu:8.2f} s CPU   "
          f"peak RSS {our_rss:8.1f} MiB", flush=True)
    print(f"create_batchinput.py vs jq: {jq_wall / our_wall:.2f}x by wall time ({our_wall:.2f} s vs {jq_wall:.2f} s), "
          f"{jq_cpu / our_cpu:.2f}x by CPU time ({our_cpu:.2f} s vs {jq_cpu:.2f} s); above 1 = faster than jq")
    parts = sorted((work / "ours").glob("batchinput*.jsonl"))
    print(f"{len(parts)} part file(s); same requests as jq: {same_requests(parts, work / 'jq.jsonl')}")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
