#!/usr/bin/env python3
"""Benchmark the fine-tuned generation engine against what a user would otherwise run.

    .venv/bin/python bench/bench_generate.py                   # CPU: tiny model + adapter, fp32
    .venv/bin/python bench/bench_generate.py --prompts 32      # a quicker run
    .venv/bin/python bench/bench_generate.py --gpu             # GPU: a larger random model in bf16
    .venv/bin/python bench/bench_generate.py --hidden 256      # head size 64: vLLM's CPU build runs it too

Builds a random-weight Llama-style model and a LoRA adapter on the spot
(``datagen.tinymodel``; nothing is downloaded) and prompts of mixed lengths, then
times, side by side in one process, greedy decoding of the same prompts with the same
base + adapter:

- (a) one prompt at a time: ``PeftModel`` + ``model.generate`` per prompt, as the
  original research scripts did;
- (b) ``transformers.pipeline("text-generation", batch_size=B)`` on the ``PeftModel``
  with ``do_sample=False`` (the pipeline samples by default);
- (c) this suite's Hugging Face engine (``datagen.finetuned.engine_hf`` through ``datagen.finetuned.generation``)
  as ``generate_data_finetuned.py`` runs it by default (``--batch_size B``,
  ``--max_batch_tokens auto``): adapter merged, prompts sorted by length into batches of B
  rows of the longest prompts and as many shorter ones as fit the same token budget (so no
  batch holds a larger KV cache than the pipeline's worst batch of B), left padding, one
  ``model.generate`` call per batch, records appended to a file as a run would.

- (d) the same run on the vLLM engine (``datagen.finetuned.engine_vllm``), when vLLM is installed
  (``make vllm``) and takes the model (its CPU build needs a head size of 32 or more:
  ``--hidden 256``): the adapter unmerged (vLLM applies LoRA per request), the same
  whole workload handed to vLLM's scheduler as one stream. Its text is the tokenizer's
  decoding of vLLM's token ids, so equal text means equal ids.

It checks that the methods produce identical greedy text (fp32 on CPU; in bf16 the merged
weights round differently, so on GPU it reports how many match), and prints tokens per
second and the ratios. Model loading is not timed; each method gets one warm-up call,
then ``--repeats`` interleaved rounds, of which the fastest run of each method counts
(on a shared machine the slower ones measure the neighbours). The CPU model is the
tests' tiny one (hidden 64, 2 layers); ``--hidden 256 --layers 4`` makes prefill
compute weigh more.

``--gpu`` uses a larger model (hidden 2048, 16 layers by default) in bf16 and also
prints the memory-bandwidth bound: each decode step reads every weight once, so at
batch B no run can beat B x bandwidth / weight bytes tokens per second (the bandwidth
is measured with a device-to-device copy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the capital of france is paris and the answer to what is seven plus five write a haiku about "
         "autumn leaves river mountain blue sky question model data evaluate result research").split()


def make_prompts(count: int, seed: int, max_words: int) -> list[str]:
    """Prompts of mixed lengths: most short, some long (as in real evaluation sets)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = int(round(3 + (max_words - 3) * rng.random() ** 2))
        prompts.append(" ".join(rng.choice(WORDS) for _ in range(words)))
    return prompts


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def one_at_a_time(model, tokenizer, prompts, max_new_tokens, device):
    import torch

    texts, tokens = [], 0
    with torch.inference_mode():
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt").to(device)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            new = output[0, encoded["input_ids"].shape[1]:]
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts, tokens


def with_pipeline(pipe, prompts, max_new_tokens, batch_size):
    outputs = pipe(prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=False,
                   return_full_text=False)
    return [out[0]["generated_text"] for out in outputs]


def with_engine(make_engine, prompts, max_new_tokens, out_path):
    """A run of ``generate_data_finetuned.py``'s kind on the engine ``make_engine()`` gives
    (a fresh Hugging Face engine each run, so its batch counters are this run's)."""
    from datagen.finetuned import generation, inputs
    from datagen.common.params import GenParams

    engine = make_engine()
    requests = [inputs.Request(f"r{i}", i, f"prompt {i}", text=p, raw=True) for i, p in enumerate(prompts)]
    out_path.unlink(missing_ok=True)
    stats = generation.run_generation(engine, requests, out_path, GenParams(temperature=0, max_tokens=max_new_tokens),
                                      show_progress=False)
    with open(out_path, encoding="utf-8") as handle:
        by_id = {r["custom_id"]: r for r in map(json.loads, handle)}
    return [by_id[f"r{i}"]["generated_text"] for i in range(len(prompts))], (stats, engine)


def start_vllm(base, adapter, dtype: str, context: int, gpu: bool):
    """The vLLM engine on the same base and adapter, or (None, why not)."""
    from datagen.finetuned import engine_vllm
    from datagen.common.errors import UserError

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the table
    if not gpu:  # vLLM's CPU build: a small KV cache, every core for the model
        cores = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if cores == list(range(cores[0], cores[-1] + 1)):
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
    try:
        return engine_vllm.VLLMEngine(str(base), {"adapter": str(adapter)}, dtype=dtype, max_model_len=context), ""
    except UserError as exc:
        return None, str(exc)


def unsorted_pad_tokens(tokenizer, prompts, batch_size) -> int:
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    pads = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        pads += sum(max(chunk) - n for n in chunk)
    return pads


def measure_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (reads + writes)."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="number of prompts")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--batch_size", type=int, default=16, help="B for the pipeline and the engine")
    parser.add_argument("--max_words", type=int, default=160, help="longest prompt, in words")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default 64 on CPU, 2048 with --gpu)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 2 on CPU, 16 with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA in bf16 with a larger model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--large_batch", type=int, default=0,
                        help="also time the engine at this batch size (default 0: skip); the pipeline stays at B")
    parser.add_argument("--max_batch_tokens", default="auto",
                        help="the engine's token budget, as generate_data_finetuned.py takes it (default auto; "
                             "0: plain batches of B)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of every method, interleaved; the best of each counts")
    parser.add_argument("--vllm", choices=("auto", "on", "off"), default="auto",
                        help="(d), the vLLM engine: auto (when installed and it takes the model), on (fail if not), off")
    parser.add_argument("--skip_one_at_a_time", action="store_true", help="skip (a), the slow baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    budget = None if args.max_batch_tokens == "auto" else int(args.max_batch_tokens)

    import torch
    import transformers
    from peft import PeftModel

    from datagen.finetuned import engine_hf, hf_model
    from datagen import tinymodel

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here", file=sys.stderr)
        return 1
    hidden = args.hidden or (2048 if args.gpu else 64)  # CPU: the tests' tiny model
    layers = args.layers or (16 if args.gpu else 2)
    dtype = "bfloat16" if args.gpu else "float32"
    device = torch.device("cuda" if args.gpu else "cpu")

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        tmp = Path(tmp)
        base = tinymodel.build_tiny_model(tmp / "base", seed=args.seed, hidden=hidden, layers=layers)
        adapter = tinymodel.build_tiny_adapter(base, tmp / "adapter", seed=args.seed + 1)
        prompts = make_prompts(args.prompts, args.seed, args.max_words)
        B, N = args.batch_size, args.max_new_tokens

        # What a user would load for (a) and (b): base + PeftModel, unmerged.
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
        peft_model = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)), str(adapter))
        peft_model.to(device).eval()
        pipe = transformers.pipeline("text-generation", model=peft_model, tokenizer=tokenizer, device=device)
        loaded = hf_model.load_model(str(base), str(adapter), dtype=dtype, device_map=str(device) if args.gpu else None)
        def hf_engine(batch_size=B):
            return engine_hf.HFEngine(loaded, batch_size=batch_size, max_batch_tokens=budget)

        vllm_engine, vllm_why = None, "--vllm off"
        if args.vllm != "off":
            vllm_engine, vllm_why = start_vllm(base, adapter, dtype, 1024, args.gpu)
            if vllm_engine is None and args.vllm == "on":
                print(f"--vllm on: {vllm_why}", file=sys.stderr)
                return 1
        params = sum(p.numel() for p in loaded.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        print(f"model: Llama-style, hidden {hidden}, {layers} layers, {params / 1e6:.1f}M parameters, {dtype}, "
              f"on {device}{'' if args.gpu else f' ({torch.get_num_threads()} threads)'}; LoRA r=8 on q,k,v,o")
        print(f"work: {len(prompts)} prompts ({min(map(len, map(str.split, prompts)))}-"
              f"{max(map(len, map(str.split, prompts)))} words), greedy, {N} new tokens, batch size {B}")

        # Warm-ups, not timed.
        one_at_a_time(peft_model, tokenizer, prompts[:1], 2, device)
        with_pipeline(pipe, prompts[:2], 2, 2)
        with_engine(hf_engine, prompts[:2], 2, tmp / "warm.jsonl")
        if vllm_engine is not None:
            with_engine(lambda: vllm_engine, prompts[:2], 2, tmp / "warm.jsonl")

        sync = torch.cuda.synchronize if args.gpu else (lambda: None)

        # Interleaved rounds, so a burst of load elsewhere hits every method alike.
        methods = {"c": lambda: with_engine(hf_engine, prompts, N, tmp / "out.jsonl"),
                   "b": lambda: with_pipeline(pipe, prompts, N, B)}
        if not args.skip_one_at_a_time:
            methods["a"] = lambda: one_at_a_time(peft_model, tokenizer, prompts, N, device)
        if vllm_engine is not None:
            methods["d"] = lambda: with_engine(lambda: vllm_engine, prompts, N, tmp / "vllm.jsonl")
        if args.large_batch and args.large_batch != B:
            methods["c2"] = lambda: with_engine(lambda: hf_engine(args.large_batch), prompts, N, tmp / "large.jsonl")
        runs: dict[str, list] = {key: [] for key in methods}
        for _ in range(args.repeats):
            for key, fn in methods.items():
                runs[key].append(timed(lambda: (fn(), sync())[0]))
        best = {key: min(values, key=lambda run: run[1]) for key, values in runs.items()}
        (engine_texts, (stats, engine)), t_engine = best["c"]
        tokens = stats.completion_tokens
        rows = [("(b) pipeline(batch_size=%d)" % B, best["b"][1], best["b"][0]),
                ("(c) engine, batch %d" % B, t_engine, engine_texts)]
        if "d" in best:
            rows.append(("(d) vLLM engine, batch %d" % B, best["d"][1], best["d"][0][0]))
        if "c2" in best:
            rows.append(("(c') engine, batch %d" % args.large_batch, best["c2"][1], best["c2"][0][0]))
        if "a" in best:
            (one_texts, one_tokens), t_one = best["a"]
            rows.insert(0, ("(a) one prompt at a time", t_one, one_texts))
            assert one_tokens == tokens, (one_tokens, tokens)

        print(f"\n{'method':<30}{'seconds':>10}{'tok/s':>12}  greedy text equal to (c)")
        for name, seconds, texts in rows:
            same = sum(a == b for a, b in zip(texts, engine_texts))
            print(f"{name:<30}{seconds:>10.2f}{tokens / seconds:>12,.0f}  {same}/{len(prompts)}")
        t_pipe = best["b"][1]
        print(f"\nengine vs pipeline, both batch {B}: {t_pipe / t_engine:.2f}x")
        if not args.skip_one_at_a_time:
            print(f"engine vs one prompt at a time: {t_one / t_engine:.1f}x")
        if "d" in best:
            t_vllm = best["d"][1]
            print(f"vLLM engine vs this engine (Hugging Face), both batch {B}: {t_engine / t_vllm:.2f}x; "
                  f"vs pipeline: {t_pipe / t_vllm:.2f}x")
        else:
            print(f"(d) vLLM engine not timed: {vllm_why}")
        if "c2" in best:
            print(f"engine at batch {args.large_batch} vs pipeline at batch {B}: {t_pipe / best['c2'][1]:.2f}x "
                  "(the engine halves a batch on out-of-memory, so a large batch is a safe request)")
        print(f"\npad tokens: {unsorted_pad_tokens(tokenizer, prompts, B):,} in input-order batches, "
              f"{engine.pad_tokens:,} in the engine's length-sorted batches "
              f"({engine.batches} batches with --max_batch_tokens {args.max_batch_tokens}; "
              f"{-(-len(prompts) // B)} of {B} rows without a budget)")
        if args.gpu:
            bandwidth = measure_bandwidth(device)
            steps = -(-len(prompts) // B) * N
            bound = tokens / (steps * weight_bytes / bandwidth)
            print(f"memory-bandwidth bound: {weight_bytes / 1e9:.2f} GB of weights, {bandwidth / 1e12:.2f} TB/s "
                  f"measured -> >= {weight_bytes / bandwidth * 1e3:.2f} ms a decode step, at most {bound:,.0f} tok/s "
                  f"at batch {B}; the engine reached {tokens / t_engine:,.0f} tok/s "
                  f"({tokens / t_engine / bound:.0%} of the bound)")
        mismatched = [name for name, _, texts in rows if texts != engine_texts]
        if mismatched and not args.gpu:
            print(f"MISMATCH: {', '.join(mismatched)} differ from the engine in fp32", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
