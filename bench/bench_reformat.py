#!/usr/bin/env python3
"""Benchmark reformat_results.py against a jq one-liner on realistic Batch API results.

    .venv/bin/python bench/bench_reformat.py                 # 1,000,000 lines (about 1.2 GB)
    .venv/bin/python bench/bench_reformat.py --lines 20000   # a quick run

Generates an OpenAI chat-completions output file in shuffled order (as the Batch API
returns it) plus its ``.errors.jsonl`` (1% HTTP errors, 0.5% ``batch_expired``), then
times, side by side in one run:

- ``reformat_results.py --input_file results.jsonl results.jsonl.errors.jsonl
  --output_file out.jsonl`` (id order, duplicates resolved, failed file written), and
  again with ``--batch_input`` (output in the input's order, missing ids counted);
- what a user would otherwise type: ``jq -c 'select(.response.status_code == 200 and
  .error == null) | {id: .custom_id, generated_text: .response.body.choices[0].message.content}'``
  over both files, which extracts the same pairs but neither orders, dedupes nor
  accounts for failures.

It prints wall time, the ratio and the peak RSS of each command (``getrusage`` of the
child, i.e. the maximum resident set size). Files go to ``bench/out/`` (git-ignored)
unless ``--work_dir`` says otherwise; ``--keep`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the model answer is that a LoRA adapter adds low-rank matrices to frozen weights so "
         "fine-tuning touches few parameters; résumé naïve 東京 \"quoted\" and\nnew lines, "
         "numbers 3.14159 42 and tabs\tinside text").split(" ")
JQ_FILTER = ('select(.response.status_code == 200 and .error == null) | '
             '{id: .custom_id, generated_text: .response.body.choices[0].message.content}')


def answer(rng: random.Random) -> str:
    """A realistic answer: 10 to 250 words (about 60 to 1,500 characters)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 250)))


def success_line(custom_id: str, rng: random.Random) -> dict:
    content = answer(rng)
    completion_tokens = max(1, len(content) // 4)
    return {
        "id": f"batch_req_{rng.getrandbits(96):024x}",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": f"{rng.getrandbits(128):032x}",
            "body": {
                "id": f"chatcmpl-{rng.getrandbits(120):030x}",
                "object": "chat.completion",
                "created": 1732500000 + rng.randint(0, 86400),
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop" if rng.random() > 0.03 else "length",
                }],
                "usage": {
                    "prompt_tokens": rng.randint(20, 400),
                    "completion_tokens": completion_tokens,
                    "total_tokens": completion_tokens + 100,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                  "accepted_prediction_tokens": 0,
                                                  "rejected_prediction_tokens": 0},
                },
                "service_tier": "default",
                "system_fingerprint": "fp_0ba0d124f1",
            },
        },
        "error": None,
    }


def http_error_line(custom_id: str, rng: random.Random) -> dict:
    return {
        "id": f"batch_req_{rng.getrandbits(96):024x}",
        "custom_id": custom_id,
        "response": {
            "status_code": 400,
            "request_id": f"{rng.getrandbits(128):032x}",
            "body": {"error": {"message": "This model's maximum context length is 128000 tokens.",
                               "type": "invalid_request_error", "param": "messages",
                               "code": "context_length_exceeded"}},
        },
        "error": None,
    }


def expired_line(custom_id: str, rng: random.Random) -> dict:
    return {"id": f"batch_req_{rng.getrandbits(96):024x}", "custom_id": custom_id, "response": None,
            "error": {"code": "batch_expired",
                      "message": "This request could not be executed before the completion window expired."}}


def generate(work: Path, lines: int, seed: int = 0) -> dict[str, Path]:
    """Write batchinput.jsonl, results.jsonl (shuffled) and results.jsonl.errors.jsonl."""
    rng = random.Random(seed)
    paths = {"batch_input": work / "batchinput.jsonl", "output": work / "results.jsonl",
             "errors": work / "results.jsonl.errors.jsonl"}
    order = list(range(lines))
    rng.shuffle(order)
    with open(paths["batch_input"], "w", encoding="utf-8") as handle:
        for index in range(lines):
            handle.write(json.dumps({"custom_id": f"request-{index}", "method": "POST",
                                     "url": "/v1/chat/completions",
                                     "body": {"model": "gpt-4o-mini", "messages": [
                                         {"role": "user", "content": f"Question number {index}?"}]}},
                                    ensure_ascii=False) + "\n")
    with open(paths["output"], "w", encoding="utf-8") as out, \
            open(paths["errors"], "w", encoding="utf-8") as errors:
        for index in order:
            custom_id = f"request-{index}"
            draw = rng.random()
            if draw < 0.01:
                errors.write(json.dumps(http_error_line(custom_id, rng)) + "\n")
            elif draw < 0.015:
                errors.write(json.dumps(expired_line(custom_id, rng)) + "\n")
            else:
                out.write(json.dumps(success_line(custom_id, rng), ensure_ascii=False) + "\n")
    return paths


def timed(command: list[str], stdout=None) -> tuple[float, float, float]:
    """Run a command; return (wall seconds, CPU seconds, peak RSS in MiB) of that child alone.

    CPU time (user + system) is printed beside wall time because it is steadier on a
    shared machine."""
    # RUSAGE_CHILDREN keeps the maximum over all waited-for children, so run each
    # command through a fresh Python helper that reports its own child's figure.
    probe = ("import resource,subprocess,sys,time,json;"
             "t=time.perf_counter();"
             "out=open(sys.argv[1],'wb') if sys.argv[1]!='-' else None;"
             "rc=subprocess.run(sys.argv[2:],stdout=out).returncode;"
             "w=time.perf_counter()-t;"
             "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
             "print(json.dumps([rc,w,u.ru_utime+u.ru_stime,u.ru_maxrss]))")
    result = subprocess.run([sys.executable, "-c", probe, str(stdout or "-"), *command],
                            capture_output=True, text=True)
    try:
        rc, wall, cpu, rss_kib = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"benchmark helper failed: {result.stderr}")
    if rc != 0:
        raise SystemExit(f"command failed (exit {rc}): {' '.join(command)}\n{result.stderr}")
    return wall, cpu, rss_kib / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_000_000, help="requests to generate")
    parser.add_argument("--work_dir", default=str(ROOT / "bench" / "out" / "reformat"),
                        help="where the generated files go")
    parser.add_argument("--jq", default=shutil.which("jq") or "/usr/bin/jq", help="jq binary")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    paths = generate(work, args.lines, args.seed)
    size = paths["output"].stat().st_size + paths["errors"].stat().st_size
    print(f"generated {args.lines:,} requests ({size / 1e6:,.0f} MB of results) in "
          f"{time.perf_counter() - started:.1f} s under {work}")

    env_python = sys.executable
    script = str(ROOT / "reformat_results.py")
    os.environ["TQDM_DISABLE"] = "1"
    inputs = [str(paths["output"]), str(paths["errors"])]
    runs = [
        ("jq one-liner (pairs only)", [args.jq, "-c", JQ_FILTER, *inputs], work / "jq.jsonl"),
        ("reformat_results.py", [env_python, script, "--input_file", *inputs,
                                 "--output_file", str(work / "reformatted.jsonl"), "--log_level", "WARNING"], None),
        ("reformat_results.py --batch_input", [env_python, script, "--input_file", *inputs,
                                               "--batch_input", str(paths["batch_input"]),
                                               "--output_file", str(work / "reformatted-ordered.jsonl"),
                                               "--log_level", "WARNING"], None),
    ]
    results = []
    for name, command, stdout in runs:
        wall, cpu, rss = timed(command, stdout)
        results.append((name, wall, cpu, rss))
        print(f"  {name:<36} {wall:8.2f} s wall {cpu:8.2f} s CPU   peak RSS {rss:8.1f} MiB", flush=True)

    _, jq_wall, jq_cpu, _ = results[0]
    for name, wall, cpu, _ in results[1:]:
        print(f"{name} vs jq: {jq_wall / wall:.2f}x by wall time ({wall:.2f} s vs {jq_wall:.2f} s), "
              f"{jq_cpu / cpu:.2f}x by CPU time ({cpu:.2f} s vs {jq_cpu:.2f} s); above 1 = faster than jq")
    jq_pairs = sum(1 for _ in open(work / "jq.jsonl", encoding="utf-8"))
    ours = sum(1 for _ in open(work / "reformatted.jsonl", encoding="utf-8"))
    print(f"lines: jq {jq_pairs:,}, reformat_results.py {ours:,} "
          f"(+ {sum(1 for _ in open(work / 'reformatted.failed.jsonl', encoding='utf-8')):,} in the failed file)")
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
