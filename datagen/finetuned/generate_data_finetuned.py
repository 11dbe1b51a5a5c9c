#!/usr/bin/env python3
"""Answer prompts with a Hugging Face base model and a LoRA adapter, in fast, resumable batches.

    python generate_data_finetuned.py --model_name_or_path demo/model/base --adapter_path demo/model/adapter \\
        --input_file examples/prompts.jsonl --id_field id --output_file generations.jsonl --batch_size 32
    python generate_data_finetuned.py --model_name_or_path demo/model/base --adapter_path demo/model/adapter \\
        --input_file demo/batchinput.jsonl --output_file answers_ft.jsonl    # the OpenAI route's input

--input_file: prompts or the OpenAI route's batch input (same ids). One JSON line per
request, appended as it finishes; rerun to resume. Examples use make demo's tiny model.
Engines, decoding, adapters, output fields, shards: docs/generate_data_finetuned.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from datagen import cache as answer_cache
from datagen.batchapi import batchfile
from datagen.common import cli, params, prompts
from datagen.common.errors import UserError
from datagen.finetuned import generation, inputs, loading, model_files, records

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
    parser = cli.make_parser(__doc__, prog="generate_data_finetuned.py",
                             usage="%(prog)s --model_name_or_path MODEL --input_file FILE [options]")
    files = parser.add_argument_group("model and files")
    cli.add_flag(files, "model_name_or_path", required=True, help="base model: a local folder or a hub id")
    cli.add_flag(files, "adapter_path", action="append", default=None, metavar="[NAME=]PATH",
                 help="LoRA adapter; repeatable: OUT_STEM.NAME.jsonl each" + OWN_DEFAULT)
    cli.add_flag(files, "with_base", action="store_true",
                 help="also answer with the base model (OUT_STEM.base.jsonl)")
    cli.add_flag(files, "input_file", required=True,
                 help="prompts file, or the OpenAI route's batch input")
    cli.add_flag(files, "output_file", default="generations.jsonl",
                 help="appended and resumed (default: generations.jsonl)" + OWN_DEFAULT)
    cli.add_flag(files, "regenerate_mismatched", action="store_true",
                 help="remake records made differently (old: OUTPUT.replaced)")
    cli.add_flag(files, "ignore_unsupported_fields", action="store_true",
                 help="skip body fields this route cannot honour (tools...)")
    prompt_group = prompts.add_prompt_args(parser)
    cli.add_flag(prompt_group, "use_chat_template", default="auto", choices=["auto", "always", "never"],
                 help="auto: use the tokenizer's chat template when it has one; always: fail without one")
    gen = parser.add_argument_group("generation (a flag given here overrides each batch line's value)")
    cli.add_flag(gen, "max_new_tokens", type=params.max_tokens_flag, metavar="N", default=None,
                 help=f"new tokens a sample (default: batch line's, else {params.DEFAULT_MAX_TOKENS})"
                      + OWN_DEFAULT)
    cli.add_flag(gen, "do_sample", action="store_true", default=None,
                 help="sample (default: when the temperature is above 0)" + OWN_DEFAULT)
    cli.add_flag(gen, "no_do_sample", dest="do_sample", action="store_false", default=argparse.SUPPRESS,
                 help="greedy decoding, whatever the temperature")
    cli.add_flag(gen, "temperature", type=params.temperature_flag, default=None,
                 help=f"0 = greedy (default: the batch line's, else {params.DEFAULT_TEMPERATURE:g})" + OWN_DEFAULT)
    cli.add_flag(gen, "top_p", type=params.top_p_flag, default=None, help=f"nucleus sampling mass (default {params.DEFAULT_TOP_P})" + OWN_DEFAULT)
    cli.add_flag(gen, "seed", type=params.seed_flag, default=None,
                 help=f"sampling seed (default: the batch line's, else {params.DEFAULT_SEED})" + OWN_DEFAULT)
    cli.add_flag(gen, "num_return_sequences", type=params.n_flag, metavar="N", default=None, help="samples per prompt (default: batch line's n, else 1)" + OWN_DEFAULT)
    cli.add_flag(gen, "stop", action="append", default=None, metavar="TEXT", type=params.stop_flag, dash_value=True,
                 help="stop string; repeatable (default: the batch line's)" + OWN_DEFAULT)
    run = parser.add_argument_group("engine, speed and placement")
    cli.add_flag(run, "engine", default="auto", choices=["auto", "hf", "vllm"],
                 help="auto (default): vllm when installed on a GPU, else hf" + OWN_DEFAULT)
    cli.add_flag(run, "tensor_parallel_size", type=int, metavar="N", default=1, help="vllm: GPUs to split the model over")
    cli.add_flag(run, "gpu_memory_utilization", metavar="SHARE", type=cli.number(0.01, 1), default=0.9,
                 help="vllm: share of GPU memory to use")
    cli.add_flag(run, "max_model_len", type=int, default=None,
                 help="vllm: context length (default: the model's)" + OWN_DEFAULT)
    cli.add_flag(run, "batch_size", type=int, default=32,
                 help="hf: prompts per batch, halved on OOM (default: 32)" + OWN_DEFAULT)
    cli.add_flag(run, "max_batch_tokens", type=batch_tokens, default=None, metavar="auto|N|0",
                 help="hf: token budget of a batch; auto (default) fits more short prompts; 0: off"
                      + OWN_DEFAULT)
    cli.add_flag(run, "no_merge_lora", dest="merge_lora", action="store_false",
                 help="keep the adapter unmerged (slower, exact)" + OWN_DEFAULT)
    cli.add_flag(run, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                 help="auto (default): bfloat16 on GPU, float32 on CPU" + OWN_DEFAULT)
    cli.add_flag(run, "device_map", default=None,
                 help='e.g. "auto" or "cuda:0" (default: auto on a GPU)' + OWN_DEFAULT)
    cli.add_flag(run, "trust_remote_code", action="store_true",
                 help="run the model repository's code (trusted ones only)")
    shards = parser.add_argument_group("sharding (defaults from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)")
    cli.add_flag(shards, "shard_index", type=int, default=None, help="shard K, 0-based: rows K, K+N, ... (default 0)" + OWN_DEFAULT)
    cli.add_flag(shards, "num_shards", type=int, default=None, help="number of shards N (default 1)" + OWN_DEFAULT)
    answer_cache.add_cache_args(parser)
    cli.add_logging_args(parser)
    return parser


def shard_of(args) -> tuple[int, int]:
    """(shard index, shard count): the flags, else the SLURM array task, else (0, 1)."""
    env_index, env_count = inputs.shard_from_env()
    shard_index = args.shard_index if args.shard_index is not None else (env_index or 0)
    num_shards = args.num_shards if args.num_shards is not None else (env_count or 1)
    inputs.check_shard(shard_index, num_shards)
    return shard_index, num_shards


def output_paths(args) -> dict:
    """{adapter: file} this run appends to (per adapter, per shard); job_script.sh counts
    the records in them to tell progress from a stalled start."""
    shard_index, num_shards = shard_of(args)
    adapters = inputs.parse_adapters(args.adapter_path)
    return {adapter: inputs.shard_path(path, shard_index, num_shards)
            for adapter, path in inputs.adapter_outputs(args.output_file, list(adapters), args.with_base).items()}


def generate(args) -> int:
    """The run, step by step: what to read and write, the engine, the whole input checked,
    the model's files, then generation; each step refuses in one line before the next."""
    shard_index, num_shards = shard_of(args)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    adapters = inputs.parse_adapters(args.adapter_path)
    engine_name, why = loading.choose_engine(args.engine, args.device_map)
    outputs = output_paths(args)
    for output in outputs.values():
        cli.check_output_path(output, [args.input_file, *batchfile.existing_parts(Path(args.input_file))])
    model_files.check_model_name(args.model_name_or_path)  # a typo in a path: one line at once
    options = prompts.options_from_args(args)
    honoured = inputs.ENGINE_FIELDS.get(engine_name, frozenset())
    command_line = params.GenParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens,
                                    seed=args.seed, n=args.num_return_sequences, stop=args.stop,
                                    do_sample=args.do_sample)
    # Read and check the whole input before loading a model: a bad line fails in seconds.
    ids, total = inputs.check_requests(args.input_file, options, args.input_format, args.split, shard_index,
                                       num_shards, command_line, args.ignore_unsupported_fields, honoured)
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d requests -> %s", shard_index, num_shards, len(ids), total,
                 ", ".join(map(str, outputs.values())))
    plan = loading.prepare(engine_name, why, args, adapters)  # files and fingerprints, no weights
    cache = answer_cache.open_cache(args)  # None with --no_cache; a folder it cannot use: one line now

    def requests():
        return inputs.iter_shard(args.input_file, options, args.input_format, args.split, shard_index, num_shards,
                                 honoured=honoured)

    cli.set_interrupt_hint(lambda: ", ".join(f"{records.count_records(path)} of {len(ids)} requests done in {path}"
                                             for path in outputs.values()) + "; rerun the same command to resume")
    try:
        stats = generation.run_generation(plan, requests, outputs, command_line, ids=ids,
                                          use_chat_template=args.use_chat_template,
                                          regenerate_mismatched=args.regenerate_mismatched, load_engine=plan.load,
                                          cache=cache)
    finally:
        if cache is not None:
            cache.close()
    report(stats, ids, outputs)
    return 0


def report(stats: generation.RunStats, ids: list[str], outputs: dict) -> None:
    """What the run did, per output, and its speed."""
    if stats.skipped == stats.total:
        print(f"nothing to do: all {len(ids)} requests are already in {', '.join(map(str, outputs.values()))}, "
              "made as this run would make them")
        return
    rate = stats.completion_tokens / stats.seconds if stats.seconds > 0 else 0.0
    for target in stats.targets:
        failures = ""
        if target.failed:
            detail = ", ".join(f"{code} {n}" for code, n in target.failed.most_common())
            failures = f" ({sum(target.failed.values())} of them failed: {detail}; their records hold an \"error\")"
        made = target.generated + sum(target.failed.values())
        cached = f", {target.cached} from the answer cache" if target.cached else ""
        print(f"wrote {target.output}: {made} generated{failures}, {target.skipped} already there{cached}, "
              f"{made + target.skipped + target.cached} of {len(ids)} done (run {target.run})")
    print(f"{stats.completion_tokens:,} tokens in {stats.seconds:.1f} s ({rate:,.0f} tok/s)")


def main(argv=None) -> int:
    return cli.run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
