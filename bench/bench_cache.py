#!/usr/bin/env python3
"""Benchmark the answer cache at the size issue 22 asks for: a million cached answers.

    .venv/bin/python bench/bench_cache.py               # 1,000,000 answers (about 700 MB on disk)
    .venv/bin/python bench/bench_cache.py --n 100000    # a quick run

Each step runs in its own process, so each peak RSS (``getrusage``'s maximum resident set
size) is that step's alone:

1. write: ``put`` N realistic chat-completion answers (about 600 bytes each, with their
   provenance) into one namespace, then ``close``;
2. rerun: the keys of a batch input of N lines of which 1 % were never asked
   (``openai_key`` of each body), ``lookup`` of all of them (what a rerun does before it
   uploads only the misses), then ``get_many`` of all of them (a second lookup and every
   hit's answer read: what writing the merged output does).

Files go to ``bench/out/cache/`` (git-ignored) unless ``--work_dir`` says otherwise;
``--keep`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.cache import AnswerCache, openai_key  # noqa: E402

MODEL = "gpt-4o-mini"
SERVICE = "api.openai.com"
URL = "/v1/chat/completions"
ANSWER = ("A LoRA adapter adds two low-rank matrices to each frozen weight matrix, so fine-tuning "
          "trains a few million parameters instead of billions. ")


def body(i: int) -> dict:
    """The request body of input line ``i`` (one user message, greedy, bounded length)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Question {i}: what does a LoRA adapter do?"}],
            "temperature": 0, "max_tokens": 256}


def value(i: int) -> dict:
    """A cached answer as a route would put it: the Batch API's response line plus provenance."""
    return {"response": {"status_code": 200, "request_id": f"{i:032x}", "body": {
        "id": f"chatcmpl-{i:024x}", "object": "chat.completion", "created": 1765100000, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"{ANSWER}({i})", "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 18, "completion_tokens": 62, "total_tokens": 80},
        "system_fingerprint": "fp_0aa8d3e20b"}},
        "batch_id": "batch_6753f1a0c6a08190b7e4d2f1a9c3e5b7", "created": 1765100000}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def write_step(root: Path, n: int) -> dict:
    start = time.perf_counter()
    keys = [openai_key(SERVICE, URL, body(i)) for i in range(n)]
    keyed = time.perf_counter()
    with AnswerCache(root) as cache:
        for i, key in enumerate(keys):
            cache.put(MODEL, key, value(i))
    done = time.perf_counter()
    size = sum(p.stat().st_size for p in root.rglob("*.seg"))
    return {"keys_s": keyed - start, "write_s": done - keyed, "bytes": size, "rss_mb": peak_rss_mb()}


def rerun_step(root: Path, n: int, new: int) -> dict:
    start = time.perf_counter()
    keys = {openai_key(SERVICE, URL, body(i)) for i in range(new, n + new)}  # lines 0..new-1 dropped, new ones added
    keyed = time.perf_counter()
    cache = AnswerCache(root)
    hits = len(cache.lookup(MODEL, keys))  # what --run asks: which lines not to upload
    looked = time.perf_counter()
    read = sum(1 for _ in cache.get_many(MODEL, keys))  # what --download does: a lookup again, then each value
    done = time.perf_counter()
    return {"keys_s": keyed - start, "lookup_s": looked - keyed, "read_s": done - looked, "hits": hits,
            "read": read, "misses": len(keys) - hits, "rss_mb": peak_rss_mb()}


def child(step: str, root: Path, n: int, new: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, "--work_dir", str(root), "--n", str(n),
                          "--new", str(new)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="cached answers and batch input lines")
    parser.add_argument("--new_percent", type=float, default=1.0, help="lines of the rerun never answered")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "bench" / "out" / "cache")
    parser.add_argument("--keep", action="store_true", help="keep the cache folder")
    parser.add_argument("--step", choices=["write", "rerun"], help=argparse.SUPPRESS)
    parser.add_argument("--new", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "write":
        print(json.dumps(write_step(args.work_dir, args.n)))
        return 0
    if args.step == "rerun":
        print(json.dumps(rerun_step(args.work_dir, args.n, args.new)))
        return 0

    new = round(args.n * args.new_percent / 100)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    baseline = child("rerun", args.work_dir, 0, 0)["rss_mb"]  # the interpreter and imports alone
    wrote = child("write", args.work_dir, args.n, 0)
    rerun = child("rerun", args.work_dir, args.n, new)
    print(f"answer cache, {args.n:,} answers, {wrote['bytes'] / 1e6:,.0f} MB on disk "
          f"({wrote['bytes'] / max(args.n, 1):,.0f} bytes an entry); python + imports alone: {baseline:,.0f} MB RSS")
    print(f"write:  keys {wrote['keys_s']:6.1f} s   put + close {wrote['write_s']:6.1f} s "
          f"({args.n / max(wrote['write_s'], 1e-9):,.0f} puts/s)   peak RSS {wrote['rss_mb']:,.0f} MB")
    print(f"rerun:  keys {rerun['keys_s']:6.1f} s   lookup {rerun['lookup_s']:6.1f} s   "
          f"read every hit {rerun['read_s']:6.1f} s   peak RSS {rerun['rss_mb']:,.0f} MB")
    print(f"rerun of {args.n:,} lines ({args.new_percent:g} % new): {rerun['hits']:,} answered from the cache "
          f"({rerun['read']:,} read), {rerun['misses']:,} to upload")
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
