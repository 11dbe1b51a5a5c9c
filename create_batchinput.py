#!/usr/bin/env python3
"""Turn a prompts file into OpenAI Batch API input lines (batchinput.jsonl).

    python create_batchinput.py --input_file examples/prompts.jsonl --model_name gpt-4o-mini
    python create_batchinput.py --input_file data.parquet --model_name gpt-4o-mini \\
        --prompt_template 'Question: {question}\\nAnswer:' --id_field qid --max_tokens 256
    python create_batchinput.py --input_file examples/prompts.jsonl --model_name gpt-4o-mini \\
        --dry_run --input_price 0.075 --output_price 0.30

Reads JSONL, a JSON array, CSV/TSV, Parquet or a Hugging Face dataset folder
(save_to_disk), one record per row: a text field (--prompt_field, default "prompt") or
a whole conversation (--messages_field, default "messages"). Each row becomes one line
{"custom_id", "method": "POST", "url", "body"}; custom_id comes from --id_field or is
request-<row> (rows count from 0). Generation parameters are sent only when given,
under the name each endpoint expects.

A file holds at most 50,000 requests and 200 MB; beyond that the output is written as
numbered parts STEM.part-001.jsonl, STEM.part-002.jsonl, ... (batch_utils.py --run
takes them all). The output is complete or absent: nothing is left on an error.
The same batch file also feeds generate_data_finetuned.py, so both routes answer the
same prompts under the same custom_ids.
"""

from __future__ import annotations

import logging
import sys

from datagen import batchfile, cli, prompts
from datagen.errors import UserError

log = logging.getLogger("datagen")
CHARS_PER_TOKEN = 4  # rough English average, for --dry_run estimates only


def build_parser():
    parser = cli.make_parser(__doc__, prog="create_batchinput.py")
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
    cli.add_flag(limits, "dry_run", action="store_true",
                 help="check every row and print counts, parts, tokens and cost; write nothing")
    cli.add_flag(limits, "input_price", type=float, default=None, metavar="USD",
                 help="price per 1M input tokens, for the --dry_run cost estimate")
    cli.add_flag(limits, "output_price", type=float, default=None, metavar="USD",
                 help="price per 1M output tokens; the estimate assumes --max_tokens x n per request")
    cli.add_logging_args(parser)
    return parser


def approx_tokens(body: dict) -> int:
    """Input tokens of one request, estimated from the characters it sends."""
    text = 0
    for key in ("messages", "input", "prompt", "instructions"):
        value = body.get(key)
        if isinstance(value, str):
            text += len(value)
        elif isinstance(value, list):
            for message in value:
                content = message.get("content") if isinstance(message, dict) else message
                text += len(content) if isinstance(content, str) else len(str(content))
                text += 4 * CHARS_PER_TOKEN  # per-message overhead of chat formats
    return max(1, text // CHARS_PER_TOKEN)


def create(args) -> int:
    if not args.model_name.strip():
        raise UserError("--model_name is empty; name the model, e.g. --model_name gpt-4o-mini")
    endpoint = batchfile.check_endpoint(args.endpoint)
    params = batchfile.params_from_args(args)
    batchfile.check_params(endpoint, params)
    options = prompts.options_from_args(args)
    if not args.dry_run:
        output = cli.check_output_path(args.output_file, [args.input_file])
        if output.suffix != ".jsonl":
            raise UserError(f"--output_file {output}: the Batch API takes .jsonl files only; end the name in .jsonl")
    input_tokens = 0
    ids = batchfile.DuplicateFinder()
    with batchfile.BatchFileWriter(args.output_file, args.max_requests_per_file, args.max_bytes_per_file,
                                   dry_run=args.dry_run) as writer:
        stream = prompts.iter_prompts(args.input_file, options, args.input_format, args.split)
        for prompt in cli.progress(stream, desc="rows", unit="row"):
            body = batchfile.build_body(endpoint, args.model_name, prompt, params)
            ids.add(prompt.custom_id)
            writer.add(batchfile.build_line(prompt.custom_id, endpoint, body), prompt.where)
            if args.dry_run:
                input_tokens += approx_tokens(body)
        check_unique_ids(ids, args, options)
        paths = writer.commit()
    report(args, writer, paths, input_tokens, params)
    return 0


def check_unique_ids(ids: batchfile.DuplicateFinder, args, options) -> None:
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


def usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def report(args, writer: batchfile.BatchFileWriter, paths, input_tokens: int, params) -> None:
    count, parts = writer.count, len(paths)
    verb = "would write" if args.dry_run else "wrote"
    if parts > 1:
        log.info("over the per-file limits (%s requests, %s bytes): split into %d parts",
                 f"{args.max_requests_per_file:,}", f"{args.max_bytes_per_file:,}", parts)
    for path, n, size in zip(paths, writer.part_counts, writer.part_bytes):
        print(f"{verb} {path}: {n:,} requests, {size:,} bytes")
    if not args.dry_run:
        return
    samples = params.n or 1
    print(f"total: {count:,} requests in {parts} file(s), about {input_tokens:,} input tokens "
          f"(~{CHARS_PER_TOKEN} characters per token)")
    if params.max_tokens is not None:
        print(f"output: at most {count * samples * params.max_tokens:,} tokens ({params.max_tokens} x {samples} per request)")
    if args.input_price is not None:
        cost = input_tokens / 1e6 * args.input_price
        line = f"estimated cost: {usd(cost)} input"
        if args.output_price is not None and params.max_tokens is not None:
            out_cost = count * samples * params.max_tokens / 1e6 * args.output_price
            line += f" + at most {usd(out_cost)} output = at most {usd(cost + out_cost)}"
        print(line + " (at the prices given; batch prices are usually half the standard ones)")


def main(argv=None) -> int:
    return cli.run(build_parser(), create, argv)


if __name__ == "__main__":
    sys.exit(main())
