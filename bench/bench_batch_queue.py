#!/usr/bin/env python3
"""Benchmark the queue of batch_utils.py --run --wait on a large split input.

    .venv/bin/python bench/bench_batch_queue.py                     # 1,000,000 requests in 20 parts
    .venv/bin/python bench/bench_batch_queue.py --requests 100000   # a quick run

Writes PARTS part files of chat requests (prompts of 5 to 40 words, --max_tokens 16),
starts the local Batch API stand-in in this process with an enqueued-token limit that
admits --admit parts at a time (one step per retrieve, so the client's polls drive it),
then runs, as a user would, in a subprocess:

    batch_utils.py --run --wait --download results.jsonl --poll_interval P

and prints its wall time, the client's CPU time and peak RSS (target < 150 MB), the
refused submissions, and whether results.jsonl holds every request exactly once. A
second run of the same command (everything done) shows what a rerun costs. Files go to
``bench/out/batch_queue/`` (git-ignored), removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.batchapi.batchfile import CHAT, part_path  # noqa: E402
from datagen.batchapi.estimates import estimate_tokens  # noqa: E402
from datagen.common.cli import number as finite_number  # noqa: E402
from datagen.local_batch_server import LocalBatchServer  # noqa: E402

WORDS = ("alpha beta gamma delta model token batch queue limit answer question river mountain "
         "paper science number window").split()
KEY = "sk-bench"


def write_parts(folder: Path, requests: int, parts: int, seed: int = 0) -> list[int]:
    """The part files; returns the estimated tokens of each."""
    rng = random.Random(seed)
    per_part = -(-requests // parts)
    tokens = []
    for number in range(1, parts + 1):
        total = 0
        with open(part_path(folder / "batchinput.jsonl", number), "w", encoding="utf-8") as handle:
            for index in range((number - 1) * per_part, min(requests, number * per_part)):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                body = {"model": "gpt-4o-mini", "max_completion_tokens": 16,
                        "messages": [{"role": "user", "content": text}]}
                total += estimate_tokens(CHAT, body)
                handle.write(json.dumps({"custom_id": f"r{index}", "method": "POST", "url": CHAT, "body": body})
                             + "\n")
        tokens.append(total)
    return tokens


def run_client(folder: Path, base_url: str, poll: float) -> tuple[subprocess.CompletedProcess, float, float, float]:
    """The command in a subprocess: (result, wall s, CPU s, peak RSS MB) of that process alone."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": KEY, "DATAGEN_PROGRESS_INTERVAL": "10",
           "DATAGEN_CACHE_DIR": str(folder / "cache")}  # never the user's answer cache
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "batch_utils.py"), "--run", "--wait", "--download",
                             "results.jsonl", "--poll_interval", str(poll)], cwd=folder, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, wall, cpu, after.ru_maxrss / 1024  # ru_maxrss: the largest child so far, in KiB


def each_once(path: Path, requests: int) -> bool:
    seen = bytearray(requests)
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            index = int(json.loads(line)["custom_id"][1:])
            if seen[index]:
                return False
            seen[index] = 1
    return all(seen)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=20)
    parser.add_argument("--admit", type=int, default=3, help="parts the token limit admits at a time")
    parser.add_argument("--poll_interval", type=finite_number(0), default=0.1, help="the client's --poll_interval")
    parser.add_argument("--work_dir", default=str(ROOT / "bench" / "out" / "batch_queue"))
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args(argv)
    folder = Path(args.work_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        start = time.perf_counter()
        tokens = write_parts(folder, args.requests, args.parts)
        size = sum(p.stat().st_size for p in folder.glob("*.jsonl"))
        print(f"input: {args.requests:,} requests in {args.parts} parts, {size / 1e6:,.0f} MB, about "
              f"{sum(tokens):,} tokens ({time.perf_counter() - start:.1f} s to write)")
        limit = args.admit * max(tokens)
        with LocalBatchServer(api_key=KEY, token_limit=limit, work_steps=10, storage=folder / "server") as server:
            (folder / "server").mkdir(exist_ok=True)
            result, wall, cpu, rss = run_client(folder, server.base_url, args.poll_interval)
            if result.returncode != 0:
                print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
                print(f"the client failed (exit {result.returncode})")
                return 1
            refused = sum(1 for b in server.batches.values() if b.obj["status"] == "failed")
            print(f"token limit {limit:,} (admits {args.admit} parts at a time): {len(server.batches)} batches "
                  f"created, {refused} refused and resubmitted")
            print(f"client: wall {wall:,.1f} s, CPU {cpu:,.1f} s ({cpu / wall:.0%} of wall), peak RSS {rss:,.0f} MB "
                  f"(target < 150 MB) -> {args.requests / wall:,.0f} requests/s end to end")
            once = each_once(folder / "results.jsonl", args.requests)
            print(f"results.jsonl holds every request exactly once: {once}")
            again, wall2, cpu2, _ = run_client(folder, server.base_url, args.poll_interval)
            print(f"rerun of the same command: exit {again.returncode}, wall {wall2:.1f} s, CPU {cpu2:.1f} s "
                  f"({'nothing to do' in again.stdout and 'nothing submitted or downloaded' or again.stdout[-200:]})")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
