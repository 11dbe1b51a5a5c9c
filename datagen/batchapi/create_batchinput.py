#!/usr/bin/env python3
"""Turn a prompts file into OpenAI Batch API input lines (batchinput.jsonl).

    python create_batchinput.py --input_file examples/prompts.jsonl --model_name gpt-4o-mini
    python create_batchinput.py --input_file examples/prompts.jsonl --model_name gpt-4o-mini \\
        --prompt_template 'Name one fact about {topic}.' --id_field id --max_tokens 256
    python create_batchinput.py --input_file examples/prompts.jsonl --model_name gpt-4o-mini \\
        --dry_run --input_price 0.075 --output_price 0.30

Each row becomes one request line {"custom_id", "method", "url", "body"}; parameters are
sent only when given and checked against the API's ranges first. Past 50,000 requests or
200 MB the output is split into STEM.part-NNN.jsonl. The same file feeds
generate_data_finetuned.py. Input kinds, limits and estimates: docs/create_batchinput.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from datagen.batchapi import batch_cache, batchfile
from datagen.batchapi.batch_writer import BatchFileWriter, DuplicateFinder
from datagen.batchapi.estimates import CHARS_PER_TOKEN, add_price_args, cost_usd, input_tokens, usd
from datagen.cache import openai_key, service_of
from datagen.common import cli, prompts
from datagen.common import params as api_params
from datagen.common.errors import UserError

log = logging.getLogger("datagen")
NO_TEMPERATURE = ("no --temperature: the OpenAI API samples at temperature 1 when a request sets none, and "
                  "generate_data_finetuned.py does the same; pass --temperature 0 for greedy decoding on both routes")


def build_parser():
    parser = cli.make_parser(__doc__, prog="create_batchinput.py",
                             usage="%(prog)s --input_file FILE --model_name MODEL [options]")
    io = parser.add_argument_group("files")
    cli.add_flag(io, "input_file", required=True, help="prompts file (jsonl, json, csv, tsv, parquet) or dataset folder")
    cli.add_flag(io, "output_file", default="batchinput.jsonl", help="batch input file to write (.jsonl)")
    cli.add_flag(io, "model_name", required=True, help="model for every request, e.g. gpt-4o-mini")
    prompts.add_prompt_args(parser)
    batchfile.add_request_args(parser)
    limits = parser.add_argument_group("limits and estimates")
    cli.add_flag(limits, "max_requests_per_file", type=int, default=batchfile.MAX_REQUESTS,
                 help="start a new part file after this many requests")
    cli.add_flag(limits, "max_bytes_per_file", type=int, default=batchfile.MAX_BYTES,
                 help="start a new part file before this many bytes")
    cli.add_flag(limits, "max_tokens_per_file", type=positive_int, default=None, metavar="N",
                 help="start a new part file before N estimated tokens (input + --max_tokens x n per request); "
                      "set it to the model's enqueued-token limit or less")
    cli.add_flag(limits, "dry_run", action="store_true",
                 help="check every row and print counts, parts, tokens and cost; write nothing")
    cli.add_flag(limits, "max_enqueued_tokens", type=positive_int, default=None, metavar="N",
                 help="--dry_run: say how many parts fit the model's enqueued-token limit N at once")
    add_price_args(limits)
    cli.add_logging_args(parser)
    return parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; give an integer of at least 1")
    return value


def create(args) -> int:
    if not args.model_name.strip():
        raise UserError("--model_name is empty; name the model, e.g. --model_name gpt-4o-mini")
    endpoint = batchfile.check_endpoint(args.endpoint)
    params = batchfile.params_from_args(args)
    batchfile.check_params(endpoint, params)  # a bad flag (or --extra_body field): refused before any row is read
    options = prompts.options_from_args(args)
    if args.max_enqueued_tokens is not None and not args.dry_run:
        raise UserError("--max_enqueued_tokens goes with --dry_run here (batch_utils.py --run takes it to pace "
                        "the batches)")
    if not args.dry_run:
        output = cli.check_output_path(args.output_file, [args.input_file])
        if output.suffix != ".jsonl":
            raise UserError(f"--output_file {output}: the Batch API takes .jsonl files only; end the name in .jsonl")
    total_input_tokens = 0  # the estimate the queue and the local stand-in use too
    keyed: list[tuple[str, int]] = []  # --dry_run: (answer cache key, input tokens) per request
    service = service_of(os.environ.get("OPENAI_BASE_URL") or None)  # where batch_utils.py would send them
    ids = DuplicateFinder()
    with BatchFileWriter(args.output_file, args.max_requests_per_file, args.max_bytes_per_file,
                         dry_run=args.dry_run, max_tokens=args.max_tokens_per_file) as writer:
        stream = prompts.iter_prompts(args.input_file, options, args.input_format, args.split)
        for prompt in cli.progress(stream, desc="rows", unit="row"):
            body = batchfile.build_body(endpoint, args.model_name, prompt, params)
            api_params.check_body(endpoint, body, prompt.where)
            ids.add(prompt.custom_id)
            writer.add(batchfile.build_line(prompt.custom_id, endpoint, body), prompt.where)
            if args.dry_run:
                total_input_tokens += input_tokens(body)
                keyed.append((openai_key(service, endpoint, body, prompt.custom_id), input_tokens(body)))
        check_unique_ids(ids, args, options)
        paths = writer.commit()
    if endpoint != batchfile.EMBEDDINGS and params.temperature is None and "temperature" not in params.extra_body:
        log.warning(NO_TEMPERATURE)  # after the run, so that a failed run prints its one error line only
    answered = batch_cache.answered_in_cache(args.model_name, [key for key, _ in keyed]) if keyed else set()
    report(args, writer, paths, total_input_tokens, params,
           [tokens for key, tokens in keyed if key in answered] if answered else None)
    return 0


def check_unique_ids(ids: DuplicateFinder, args, options) -> None:
    """Confirm hash collisions against the real ids and name both rows of a duplicate."""
    for first, second in ids.candidates():
        wanted = {first, second}
        found = {}
        for index, prompt in enumerate(prompts.iter_prompts(args.input_file, options, args.input_format, args.split)):
            if index in wanted:
                found[index] = prompt
                if len(found) == 2:
                    break
        if found[first].custom_id == found[second].custom_id:
            raise UserError(f"duplicate custom_id {found[first].custom_id!r} at {found[first].where} and "
                            f"{found[second].where}; make the ids unique or drop --id_field")


def report(args, writer: BatchFileWriter, paths, total_input_tokens: int, params,
           cached: list[int] | None = None) -> None:
    """``cached``: the input tokens of each request the answer cache answers (not paid)."""
    count, parts = writer.count, len(paths)
    verb = "would write" if args.dry_run else "wrote"
    if parts > 1:
        tokens = f", {args.max_tokens_per_file:,} tokens" if args.max_tokens_per_file else ""
        log.info("over the per-file limits (%s requests, %s bytes%s): split into %d parts",
                 f"{args.max_requests_per_file:,}", f"{args.max_bytes_per_file:,}", tokens, parts)
    for path, n, size, tokens in zip(paths, writer.part_counts, writer.part_bytes, writer.part_tokens):
        print(f"{verb} {path}: {n:,} requests, {size:,} bytes, about {tokens:,} tokens (estimated input + output cap)")
    if not args.dry_run:
        return
    if args.max_enqueued_tokens is not None:
        print(fitting_parts(writer.part_tokens, args.max_enqueued_tokens))
    samples = params.n or 1
    print(f"total: {count:,} requests in {parts} file(s), about {total_input_tokens:,} input tokens "
          f"(estimated, ~{CHARS_PER_TOKEN} characters per token)")
    if cached:
        count, total_input_tokens = count - len(cached), total_input_tokens - sum(cached)
        print(f"answer cache: {len(cached):,} of them are answered already and are not submitted; to pay: "
              f"{count:,} requests, about {total_input_tokens:,} input tokens")
    if params.max_tokens is not None:
        print(f"output: at most {count * samples * params.max_tokens:,} output tokens (the cap: --max_tokens "
              f"{params.max_tokens} x n {samples} per request)")
    else:
        print("output: no bound on output tokens (no --max_tokens)")
    if args.input_price is not None:
        cost = cost_usd(total_input_tokens, 0, args.input_price, None)
        line = f"estimated cost: {usd(cost)} input"
        if args.output_price is not None and params.max_tokens is not None:
            out_cost = cost_usd(0, count * samples * params.max_tokens, None, args.output_price)
            line += f" + at most {usd(out_cost)} output = at most {usd(cost + out_cost)}"
        print(line + " (at the prices given; batch prices are usually half the standard ones)")


def fitting_parts(part_tokens: list[int], limit: int) -> str:
    """How many parts (in order) fit an enqueued-token limit at once, or which one never does."""
    too_big = [i for i, tokens in enumerate(part_tokens, start=1) if tokens > limit]
    if too_big:
        return (f"enqueued-token limit {limit:,}: part {too_big[0]} alone is about {part_tokens[too_big[0] - 1]:,} "
                f"tokens and would always be refused; split with --max_tokens_per_file {limit}")
    fit = total = 0
    for tokens in part_tokens:
        if total + tokens > limit:
            break
        fit, total = fit + 1, total + tokens
    return (f"enqueued-token limit {limit:,}: {fit} of {len(part_tokens)} part(s) fit at once (about {total:,} "
            "tokens); batch_utils.py --run --wait submits the rest as they finish")


def main(argv=None) -> int:
    return cli.run(build_parser(), create, argv)


if __name__ == "__main__":
    sys.exit(main())
