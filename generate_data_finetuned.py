#!/usr/bin/env python3
"""Answer prompts with a Hugging Face base model and a LoRA adapter, in fast, resumable batches.

    python generate_data_finetuned.py --model_name_or_path BASE --adapter_path ADAPTER \\
        --input_file examples/prompts.jsonl --id_field id --output_file generations.jsonl --batch_size 32
    python generate_data_finetuned.py --model_name_or_path BASE --adapter_path ADAPTER \\
        --input_file batchinput.jsonl --output_file generations.jsonl      # the OpenAI route's input
    python generate_data_finetuned.py ... --shard_index 0 --num_shards 4   # or a SLURM array task

--input_file is a prompts file (JSONL, JSON, CSV/TSV, Parquet, saved HF dataset; the
same flags as create_batchinput.py) or the batch input file made for the OpenAI route
(or the path of one split into .part-NNN files): then the same custom_ids are answered,
with each body's max tokens, temperature, top_p, seed, n and stop unless a flag here
overrides them. Conversations go through the tokenizer's chat template.

Greedy by default; sampling with --do_sample, or when a temperature above 0 is given.
Prompts are sorted by length into batches with left padding: --batch_size prompts of
the longest kind, and as many shorter ones as fit the same token budget
(--max_batch_tokens); greedy rows leave their batch as soon as they end. The adapter is
merged into the weights unless --no_merge_lora; on CUDA out-of-memory the batch is halved.

Output: one JSON line per request, appended as each batch finishes: custom_id,
generated_text, finish_reason, prompt_tokens, completion_tokens, samples (n > 1),
source, model, adapter, adapter_sha256, generation, created. Rerun the same command to
resume: ids already in the output are skipped. With --num_shards N (or in a SLURM array)
shard K takes rows K, K+N, ... and writes STEM.shard-KKK-of-NNN.jsonl.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datagen import batchfile, cli, generation, prompts
from datagen.errors import UserError

log = logging.getLogger("datagen")
# Appended to a help text that states its own default: formats to nothing, and stops
# the help formatter from adding "(default: None)".
OWN_DEFAULT = "%(default).0s"


def batch_tokens(text: str) -> int | None:
    """--max_batch_tokens: "auto" (None), 0 (off) or a positive number of tokens."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a number of tokens") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; use auto, 0 (off) or a positive number")
    return value


def build_parser():
    parser = cli.make_parser(__doc__, prog="generate_data_finetuned.py")
    files = parser.add_argument_group("model and files")
    cli.add_flag(files, "model_name_or_path", required=True, help="base model: a local folder or a hub id")
    cli.add_flag(files, "adapter_path", default=None, help="LoRA adapter folder (peft); without it the base model runs alone" + OWN_DEFAULT)
    cli.add_flag(files, "input_file", required=True,
                 help="prompts file (jsonl, json, csv, tsv, parquet, dataset folder) or an OpenAI batch input .jsonl")
    cli.add_flag(files, "output_file", default="generations.jsonl",
                 help="generations file, appended and resumed (per shard: STEM.shard-KKK-of-NNN.jsonl)")
    prompt_group = prompts.add_prompt_args(parser)
    cli.add_flag(prompt_group, "use_chat_template", default="auto", choices=["auto", "always", "never"],
                 help="auto: conversations and plain prompts go through the tokenizer's chat template when it has "
                      "one (not /v1/completions lines); never: raw text; always: also fail without a template")
    gen = parser.add_argument_group("generation (a flag given here overrides each batch line's value)")
    cli.add_flag(gen, "max_new_tokens", type=int, default=None,
                 help=f"new tokens per sample (default: the batch line's max tokens, else {generation.DEFAULT_MAX_NEW_TOKENS})"
                      + OWN_DEFAULT)
    cli.add_flag(gen, "do_sample", action="store_true", default=None,
                 help="sample instead of greedy decoding (default: sample only when a temperature > 0 is set)" + OWN_DEFAULT)
    cli.add_flag(gen, "no_do_sample", dest="do_sample", action="store_false", default=argparse.SUPPRESS,
                 help="greedy decoding even where a batch line sets a temperature")
    cli.add_flag(gen, "temperature", type=float, default=None,
                 help=f"sampling temperature (default when sampling: {generation.DEFAULT_TEMPERATURE}; 0 = greedy)" + OWN_DEFAULT)
    cli.add_flag(gen, "top_p", type=float, default=None, help=f"nucleus sampling mass (default {generation.DEFAULT_TOP_P})" + OWN_DEFAULT)
    cli.add_flag(gen, "seed", type=int, default=None, help=f"sampling seed (default: the batch line's, else {generation.DEFAULT_SEED})" + OWN_DEFAULT)
    cli.add_flag(gen, "num_return_sequences", "--n", type=int, default=None, help="samples per prompt (default: the batch line's n, else 1)" + OWN_DEFAULT)
    cli.add_flag(gen, "stop", action="append", default=None, metavar="TEXT",
                 help="stop string, cut from the output; repeat for several (default: the batch line's)" + OWN_DEFAULT)
    run = parser.add_argument_group("speed and placement")
    cli.add_flag(run, "batch_size", type=int, default=32,
                 help="prompts per batch for the longest prompts; shorter ones fill the same token budget, "
                      "see --max_batch_tokens (halved on CUDA out-of-memory)")
    cli.add_flag(run, "max_batch_tokens", type=batch_tokens, default=None, metavar="auto|N|0",
                 help="token budget of a batch: rows x (its longest prompt + max new tokens). auto (default): "
                      "what --batch_size rows of the longest prompts take, so short prompts go in bigger "
                      f"batches (at most {generation.BUDGET_ROWS_FACTOR}x --batch_size) within the same memory; "
                      "N: that budget; 0: plain batches of --batch_size" + OWN_DEFAULT)
    cli.add_flag(run, "merge_lora", action="store_true", default=True,
                 help="merge the adapter into the weights with merge_and_unload (faster)")
    cli.add_flag(run, "no_merge_lora", dest="merge_lora", action="store_false", default=argparse.SUPPRESS,
                 help="keep the adapter as a separate pass (slower; avoids the rounding of merged bf16/fp16 weights)")
    cli.add_flag(run, "use_generate", action="store_true",
                 help="decode greedy batches with model.generate too, instead of the engine's own loop that "
                      "drops finished rows (same text, slower; for a model the loop handles wrongly)")
    cli.add_flag(run, "compile", action="store_true",
                 help="run the greedy loop's model calls (prefill and decode steps) through torch.compile: "
                      "faster after a one-time compile (seconds to a minute, per process; needs a C++ compiler "
                      "on CPU); the same text. "
                      "Sampling and stop strings go through model.generate, uncompiled")
    cli.add_flag(run, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                 help="weights dtype; auto = bfloat16 on a GPU, float32 on CPU")
    cli.add_flag(run, "device_map", default=None,
                 help='accelerate device map, e.g. "auto" (spread over GPUs) or "cuda:0" (default: auto on a GPU, CPU otherwise)'
                      + OWN_DEFAULT)
    cli.add_flag(run, "trust_remote_code", action="store_true",
                 help="run the model repository's own Python code (only for models you trust)")
    shards = parser.add_argument_group("sharding (defaults from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)")
    cli.add_flag(shards, "shard_index", type=int, default=None, help="this shard, 0-based: takes rows K, K+N, ... (default 0)" + OWN_DEFAULT)
    cli.add_flag(shards, "num_shards", type=int, default=None, help="number of shards N (default 1)" + OWN_DEFAULT)
    cli.add_logging_args(parser)
    return parser


def generate(args) -> int:
    env_index, env_count = generation.shard_from_env()
    shard_index = args.shard_index if args.shard_index is not None else (env_index or 0)
    num_shards = args.num_shards if args.num_shards is not None else (env_count or 1)
    generation.check_shard(shard_index, num_shards)
    overrides = generation.Overrides(args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                                     args.seed, args.num_return_sequences, args.stop)
    overrides.check()
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    output = generation.shard_path(args.output_file, shard_index, num_shards)
    cli.check_output_path(output, [args.input_file, *batchfile.existing_parts(Path(args.input_file))])
    options = prompts.options_from_args(args)
    # Read and check the whole input before loading a model: a bad line fails in seconds.
    ids, total = generation.check_requests(args.input_file, options, args.input_format, args.split,
                                           shard_index, num_shards, overrides)
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d requests -> %s", shard_index, num_shards, len(ids), total, output)
    loaded = generation.load_model(args.model_name_or_path, args.adapter_path, dtype=args.dtype,
                                   device_map=args.device_map, merge=args.merge_lora,
                                   trust_remote_code=args.trust_remote_code)
    generator = generation.Generator(loaded, args.use_chat_template, fast_greedy=not args.use_generate,
                                     compile=args.compile)
    requests = generation.iter_shard(args.input_file, options, args.input_format, args.split, shard_index, num_shards)
    stats = generation.run_generation(generator, requests, output, overrides, args.batch_size, ids=ids,
                                      max_batch_tokens=args.max_batch_tokens)
    rate = stats.completion_tokens / stats.seconds if stats.seconds > 0 else 0.0
    print(f"wrote {output}: {stats.done} generated, {stats.skipped} already there, "
          f"{stats.done + stats.skipped} of {stats.total} done ({stats.completion_tokens:,} tokens, {rate:,.0f} tok/s)")
    return 0


def main(argv=None) -> int:
    return cli.run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
