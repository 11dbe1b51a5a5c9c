#!/usr/bin/env python3
"""Bring both routes' raw results into one clean, complete, ordered table.

    python reformat_results.py --input_file demo/results.jsonl --output_file reformatted.jsonl
    python reformat_results.py --input_file 'demo/results*.jsonl' --batch_input demo/batchinput.jsonl \\
        --output_file reformatted.jsonl --fail_on missing,error
    python reformat_results.py --input_file demo/generations.jsonl --source_type finetuned \\
        --batch_input demo/batchinput.jsonl --prompts_file examples/prompts.jsonl --id_field id \\
        --keep_fields topic,prompt --output_file finetuned.parquet
    python reformat_results.py --compare demo/results.jsonl demo/generations.jsonl \\
        --batch_input demo/batchinput.jsonl --output_file table.csv
    python reformat_results.py --compare answers=demo/results.jsonl lora=demo/generations.jsonl \\
        --batch_input demo/batchinput.jsonl --output_file named.csv

Reads Batch API results or fine-tuned generations (several files, globs, shards) and
writes one line per request, same columns on both routes (the examples read what
make demo wrote); failed requests go to
OUT.failed.jsonl. Prints "N ok, M failed, K missing"; missing ones exit 1 (--fail_on
says what does). --compare joins runs side by side. Details: docs/reformat_results.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from datagen.batchapi import provenance
from datagen.common import cli, prompts
from datagen.common.errors import UserError
from datagen.results import compare
from datagen.results.input_files import expand_inputs, expand_runs
from datagen.results.lines import SOURCE_TYPES, ResultOptions
from datagen.results.output import COLUMNS, output_format
from datagen.results.reformat import Summary, reformat as reformat_files
from datagen.results.requests import (PROMPT_FIELD, Requests, batch_input_requests, prompts_file_requests,
                                      prompts_file_rows)

log = logging.getLogger("datagen")


def build_parser():
    usage = "%(prog)s --input_file FILE [options]  |  %(prog)s --compare RUN [RUN ...] [options]"
    parser = cli.make_parser(__doc__, prog="reformat_results.py", usage=usage)
    io = parser.add_argument_group("files")
    what = io.add_mutually_exclusive_group(required=True)
    cli.add_flag(what, "input_file", nargs="+", metavar="FILE",
                 help="raw results: files or globs (OpenAI output + .errors.jsonl, parts, shards)")
    cli.add_flag(what, "compare", nargs="+", metavar="[NAME=]PATH",
                 help="runs to put side by side, joined on the id: each a raw or reformatted output of "
                      "either route (a file, a quoted glob, or a generations file that stands for its "
                      "shards or its adapters' files; one column per run found), NAME= names its column "
                      "(default: the run's name in its records); writes one table to --output_file")
    cli.add_flag(io, "output_file", default=None,
                 help="reformatted results (default reformatted.jsonl; with --compare compare.csv): "
                      ".jsonl, .csv, .tsv or .parquet")
    cli.add_flag(io, "failed_file", default=None,
                 help="failed and missing requests (default: OUTPUT_STEM.failed.jsonl beside --output_file)")
    cli.add_flag(io, "source_type", default="auto", choices=SOURCE_TYPES,
                 help="kind of every input line; auto recognises it (one kind per run)")
    cli.add_flag(io, "long", action="store_true",
                 help="with --compare: one row per request, run and sample instead of one per request")
    join = parser.add_argument_group("order, missing requests, kept fields and what fails the run")
    cli.add_flag(join, "batch_input", default=None, metavar="BATCHINPUT.jsonl",
                 help="the batch input the results answer (or its .part-NNN files): order and missing ids")
    cli.add_flag(join, "prompts_file", default=None, metavar="FILE",
                 help="the prompts file the requests were made from, read with the same --id_field and "
                      "prompt flags as then (with --batch_input too: only its fields, joined by custom_id)")
    cli.add_flag(join, "keep_fields", default=None, metavar="A,B",
                 help="fields of the prompts file (or of the batch request body) copied into each line; "
                      f"'{PROMPT_FIELD}' is the input the model saw, as {{role, content}} messages")
    cli.add_flag(join, "fail_on", type=fail_on, default=frozenset({"missing"}), metavar="KINDS",
                 help="what exits 1 (both files still written): a comma list of missing, error, length (cut off), "
                      "empty, or none; length/empty answers listed go to the failed file (default: missing)")
    group = prompts.add_prompt_args(parser)
    for action in group._group_actions:  # the shared help speaks of --input_file
        if action.dest == "input_format":
            action.help = "kind of --prompts_file; auto picks by extension"
    cli.add_logging_args(parser)
    return parser


FAIL_KINDS = ("missing", "error", "length", "empty")  # the failed file's reasons


def fail_on(text: str) -> frozenset[str]:
    """``--fail_on``: a comma list of FAIL_KINDS, or ``none``."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if kinds == ["none"]:
        return frozenset()
    unknown = [kind for kind in kinds if kind not in FAIL_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of {', '.join(FAIL_KINDS)}, or none")
    return frozenset(kinds)


def fail_on_text(kinds: frozenset[str]) -> str:
    """``--fail_on`` as it would be written for ``kinds``."""
    return ",".join(kind for kind in FAIL_KINDS if kind in kinds) or "none"


def result_options(args) -> ResultOptions:
    return ResultOptions(treat_length_as_failure="length" in args.fail_on,
                         treat_empty_as_failure="empty" in args.fail_on)


def parse_keep_fields(text: str | None, has_requests: bool) -> list[str]:
    if not text:
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not has_requests:
        raise UserError("--keep_fields needs --prompts_file or --batch_input to take the fields from")
    taken = [name for name in names if name in COLUMNS]
    if taken:
        raise UserError(f"--keep_fields {', '.join(taken)}: the output has its own field of that name; "
                        "keep other fields")
    if len(set(names)) != len(names):
        raise UserError("--keep_fields names a field twice")
    return names


def original_requests(args, prompt_shown: bool) -> Requests | None:
    """The requests the results answer: the batch input (order, ids, exact prompt) and/or
    the prompts file (its fields; order and ids when alone). The prompt flags are read
    only when the prompt is shown or a prompt flag is given, and only the prompts file can
    give it; then fine-tuned records are checked to answer these prompts (``asked_in``)."""
    from_prompts, asked_in = None, None
    prompt_flags = args.prompt_template or args.system_prompt or args.system_prompt_file
    if args.prompts_file:
        if (prompt_shown or prompt_flags) and not args.batch_input:
            asked_in = args.prompts_file
            options = prompts.options_from_args(args)
            from_prompts = prompts_file_requests(
                prompts.iter_prompts(args.prompts_file, options, args.input_format, args.split))
        else:
            from_prompts = prompts_file_rows(args.prompts_file, args.id_field, args.input_format, args.split)
    if args.batch_input:
        return Requests(batch_input_requests(args.batch_input), "--batch_input", from_prompts,
                        asked_in=args.batch_input)
    if from_prompts is not None:
        return Requests(from_prompts, "--prompts_file", asked_in=asked_in)
    return None


def request_sources(args) -> list[Path]:
    return [Path(p) for p in (args.batch_input, args.prompts_file) if p]


def check_not_stem(output: Path, given: list[str], flag: str, output_flag: str = "--output_file") -> None:
    """Refuse an output named like a given path that does not exist but stands for other
    files (OUT.jsonl for its shards or adapters' files): writing it would hide them."""
    for text in given:
        pattern = text.partition("=")[2] if flag == "--compare" and "=" in text and not Path(text).exists() else text
        if not Path(pattern).exists() and cli.same_file(output, pattern):
            raise UserError(f"{output_flag} {output} is {flag} {pattern}, which stands for its shards or adapters' "
                            "files; writing it would hide them: choose another output path")


def reformat(args) -> int:
    if args.compare:
        return compare_runs(args)
    if args.long:
        raise UserError("--long shapes the --compare table; give --compare RUN ... or drop --long")
    output = Path(args.output_file or "reformatted.jsonl")
    output_format(output)
    failed = Path(args.failed_file) if args.failed_file else output.with_name(output.stem + ".failed.jsonl")
    inputs = expand_inputs(args.input_file)
    provenance.check_belongs(inputs, args.batch_input)  # downloaded results of another batch input: refused
    keep_fields = parse_keep_fields(args.keep_fields, bool(args.batch_input or args.prompts_file))
    requests = original_requests(args, PROMPT_FIELD in keep_fields)
    check_outputs(args, output, failed, inputs)
    compare_hint = "--compare " + " ".join(shlex.quote(p) for p in args.input_file)
    summary = reformat_files(inputs, output, failed, source_type=args.source_type, options=result_options(args),
                             requests=requests, keep_fields=keep_fields, compare_hint=compare_hint)
    report(args, summary, output, failed, requests is not None)
    check_failures(args, summary, failed)
    return 0


def check_outputs(args, output: Path, failed: Path, inputs: list[Path]) -> None:
    """The output and failed file: never an input, never each other."""
    sources = [*inputs, *request_sources(args)]
    cli.check_output_path(output, sources)
    cli.check_output_path(failed, sources, flag="--failed_file")
    check_not_stem(output, args.input_file, "--input_file")
    check_not_stem(failed, args.input_file, "--input_file", "--failed_file")
    if cli.same_file(output, failed):
        raise UserError(f"--failed_file {failed} is the same file as --output_file; choose another name")


def check_failures(args, summary: Summary, failed: Path) -> None:
    """Exit 1 (the files are written) when a request of a kind --fail_on lists is there."""
    found = {**summary.failed_by, "missing": summary.missing}
    listed = {kind: found[kind] for kind in FAIL_KINDS if kind in args.fail_on and found.get(kind)}
    if list(listed) == ["missing"]:
        raise UserError(f"{summary.missing} of the {summary.expected} requests have no result; they are listed "
                        f"in {failed} (reason missing); "
                        f"{partial_hint(args, summary.missing == summary.expected)}")
    if listed:
        counts = ", ".join(f"{count} {kind}" for kind, count in listed.items())
        raise UserError(f"requests that fail the run (--fail_on {fail_on_text(args.fail_on)}): {counts}; "
                        f"they are listed in {failed}")


def partial_hint(args, none_found: bool) -> str:
    """How to fix missing requests: --fail_on without missing, or, when no id of a prompts
    file read without --id_field matched and its rows have an id field, --id_field."""
    if none_found and args.prompts_file and not args.batch_input and not args.id_field:
        first = next(iter(prompts.iter_rows(args.prompts_file, args.input_format, args.split)), None)
        for name in ("id", "custom_id"):
            if first is not None and isinstance(first.data, dict) and name in first.data:
                return (f"no id matched: the rows of {args.prompts_file} have an {name!r} field, pass --id_field "
                        f"{name} (the ids are request-<row> without it)")
    return f"pass --fail_on {fail_on_text(args.fail_on - {'missing'})} to accept a partial result"


def compare_runs(args) -> int:
    if args.failed_file:
        raise UserError("--failed_file is not used with --compare: the table shows failed and missing "
                        "requests in each run's status column")
    output = Path(args.output_file or "compare.csv")
    output_format(output)
    runs = expand_runs(args.compare)
    provenance.check_belongs([path for run in runs for path in run.paths], args.batch_input)
    keep_fields = parse_keep_fields(args.keep_fields, bool(args.batch_input or args.prompts_file))
    requests = original_requests(args, True)  # the table shows the prompt
    sources = [path for run in runs for path in run.paths] + request_sources(args)
    cli.check_output_path(output, sources)
    check_not_stem(output, args.compare, "--compare")
    table = compare.compare(runs, output, requests=requests, keep_fields=keep_fields, long=args.long,
                            options=result_options(args))
    report_runs(args, table, output)
    check_run_failures(args, table, output, requests is not None)
    return 0


def report_runs(args, table: compare.Table, output: Path) -> None:
    given = args.batch_input and "--batch_input" or "--prompts_file"
    for run in table.runs:
        stray = (f", {run.stray} not in {given} and left out ({', '.join(run.stray_ids)}"
                 f"{', ...' if run.stray > len(run.stray_ids) else ''})" if run.stray else "")
        print(f"{run.name}: {run.ok} ok, {run.failed} failed, {run.missing} missing{stray} "
              f"({', '.join(str(p) for p in run.paths)})")
    count = len(table.runs)
    print(f"wrote {output} ({table.rows} rows, {table.requests} requests, {count} run{'s' * (count != 1)})")


def check_run_failures(args, table: compare.Table, output: Path, has_requests: bool) -> None:
    """--fail_on for the table: missing counts only against --batch_input / --prompts_file."""
    runs = table.runs
    failed = sum(run.failed_by[kind] for run in runs for kind in args.fail_on)
    missing = sum(run.missing for run in runs) if has_requests and "missing" in args.fail_on else 0
    if failed:
        counts = f"{failed} failed" + (f", {missing} missing" if missing else "")
        raise UserError(f"results that fail the run (--fail_on {fail_on_text(args.fail_on)}): {counts}; "
                        f"see the status columns of {output}")
    if missing:
        hint = partial_hint(args, all(r.missing == table.requests for r in runs)).replace("a partial result", "them")
        per_run = ", ".join(f"{r.name}: {r.missing}" for r in runs if r.missing)
        raise UserError(f"{missing} results are missing ({per_run}); they are the rows with status missing in "
                        f"{output}; {hint}")


def report(args, summary: Summary, output: Path, failed: Path, has_requests: bool) -> None:
    counts, duplicates = summary.counts, summary.duplicates
    log.info("read %d result lines from %d file(s)", counts.lines, summary.files)
    if duplicates.ids:
        log.warning("%d custom_id(s) were read more than once (e.g. %r): kept the success for %d, "
                    "the first one read for %d", duplicates.ids, duplicates.example,
                    duplicates.success_won, duplicates.ids - duplicates.success_won)
    if counts.refusals:
        log.info("%d answer(s) are refusals (refusal: true; the refusal message is the text)", counts.refusals)
    if counts.cut_off and "length" not in args.fail_on:
        log.warning("%d answer(s) were cut off at the token limit (finish_reason length) and are kept; "
                    "--fail_on length sets them apart", counts.cut_off)
    if counts.empty and "empty" not in args.fail_on:
        log.warning("%d answer(s) are empty and are kept; --fail_on empty sets them apart", counts.empty)
    if summary.extra:
        log.warning("%d result id(s) are not in %s; they are written after its requests "
                    "(is it the file these results answer?)", summary.extra,
                    args.batch_input or args.prompts_file)
    if not has_requests:
        log.info("missing requests can only be counted against --batch_input or --prompts_file")
    print(f"{summary.ok} ok, {summary.failed} failed, {summary.missing} missing")
    print(f"wrote {output} ({summary.ok} lines) and {failed} ({summary.failed + summary.missing} lines)")


def main(argv=None) -> int:
    return cli.run(build_parser(), reformat, argv)


if __name__ == "__main__":
    sys.exit(main())
