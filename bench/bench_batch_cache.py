#!/usr/bin/env python3
"""Benchmark the answer cache on the OpenAI route: a rerun of a grown batch input.

    .venv/bin/python bench/bench_batch_cache.py                       # 1,000,000 requests, then 1 % more
    .venv/bin/python bench/bench_batch_cache.py --requests 100000     # a quick run

Writes the parts of bench_batch_queue.py, answers them all through the local stand-in
with ``batch_utils.py --run --wait --download results.jsonl`` (their answers enter the
answer cache, in ``bench/out/batch_cache/cache``, never the user's), then appends
``--grow`` (a fraction) new requests to every part and runs the same command into
``results2.jsonl``. Prints, for that rerun: wall time, peak RSS of the client, the request
lines the stand-in received (only the new ones are expected), and whether results2.jsonl
holds every request exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_batch_queue import KEY, ROOT, each_once, write_parts  # noqa: E402

from datagen.batchapi.batchfile import CHAT  # noqa: E402
from datagen.local_batch_server import LocalBatchServer  # noqa: E402


def grow(folder: Path, requests: int, fraction: float) -> int:
    """Append new requests (ids after the last) to every part; returns how many."""
    parts = sorted(folder.glob("batchinput.part-*.jsonl"))
    per_part = max(1, round(requests * fraction / len(parts)))
    index = requests
    for path in parts:
        with open(path, "a", encoding="utf-8") as handle:
            for _ in range(per_part):
                body = {"model": "gpt-4o-mini", "max_completion_tokens": 16,
                        "messages": [{"role": "user", "content": f"a new question number {index}"}]}
                handle.write(json.dumps({"custom_id": f"r{index}", "method": "POST", "url": CHAT, "body": body}) + "\n")
                index += 1
    return index - requests


# The client's own peak: VmHWM (Linux). ru_maxrss would also count this (big) process: a child
# started by vfork keeps the RSS high-water mark of the memory it shared until its exec.
WRAPPER = ("import os, resource, runpy, sys\n"
           "sys.argv = sys.argv[1:]\nsys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
           "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
           "finally:\n"
           "    try:\n"
           "        peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
           "    except (OSError, StopIteration):\n"
           "        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
           "    print(f'peak RSS KiB {peak}', file=sys.stderr)")


def run_client(folder: Path, base_url: str, output: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """``batch_utils.py --run --wait --download OUTPUT`` in a subprocess: (result, wall s, its own peak RSS MB)."""
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": KEY, "DATAGEN_PROGRESS_INTERVAL": "10",
           "DATAGEN_CACHE_DIR": str(folder / "cache")}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WRAPPER, str(ROOT / "batch_utils.py"), "--run", "--wait",
                             "--download", output, "--poll_interval", "0.1"], cwd=folder, env=env,
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = [line for line in result.stderr.splitlines() if line.startswith("peak RSS KiB ")]
    return result, wall, int(peak[-1].split()[-1]) / 1024 if peak else float("nan")


def run_or_say(folder: Path, base_url: str, output: str) -> tuple[float, float]:
    """run_client's wall time and peak RSS; a failed client prints its output and stops the bench."""
    result, wall, rss = run_client(folder, base_url, output)
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-2000:], sep="\n")
        raise SystemExit(1)
    return wall, rss


def received(server: LocalBatchServer, skip: int) -> int:
    """Request lines in the batch inputs the stand-in received, after the first ``skip`` files."""
    inputs = [f for f in server.files.values() if f.obj["purpose"] == "batch"][skip:]
    return sum(sum(1 for line in open(f.path, "rb") if line.strip()) for f in inputs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--parts", type=int, default=25, help="part files (each grows: keep them under 50,000)")
    parser.add_argument("--grow", type=float, default=0.01, help="new requests, as a fraction of --requests")
    parser.add_argument("--work_dir", default=str(ROOT / "bench" / "out" / "batch_cache"))
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args(argv)
    folder = Path(args.work_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        write_parts(folder, args.requests, args.parts)
        with LocalBatchServer(api_key=KEY, work_steps=10, storage=folder / "server") as server:
            (folder / "server").mkdir(exist_ok=True)
            first_wall, rss = run_or_say(folder, server.base_url, "results.jsonl")
            print(f"first run: {args.requests:,} requests answered and cached, wall {first_wall:,.1f} s, peak RSS "
                  f"{rss:,.0f} MB")
            uploads = len([f for f in server.files.values() if f.obj["purpose"] == "batch"])
            new = grow(folder, args.requests, args.grow)
            wall, rss = run_or_say(folder, server.base_url, "results2.jsonl")
            paid = received(server, uploads)
            print(f"rerun with {new:,} new requests ({args.grow:.0%}): wall {wall:,.1f} s, peak RSS {rss:,.0f} MB; "
                  f"the stand-in received {paid:,} request lines")
            print(f"ratio, against a rerun without the cache (all {args.requests + new:,} requests sent again, "
                  f"as in the first run): {first_wall / wall:.2f}x the speed, {(args.requests + new) / max(paid, 1):,.0f}x "
                  "fewer request lines paid")
            print(f"results2.jsonl holds every request exactly once: "
                  f"{each_once(folder / 'results2.jsonl', args.requests + new)}")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
