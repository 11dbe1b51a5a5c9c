#!/usr/bin/env python3
"""Submit, watch and download OpenAI batches: the whole Batch API lifecycle.

    python batch_utils.py --run --file batchinput.jsonl --description "gpt-4o-mini, eval v2"
    python batch_utils.py --check                     # status of the saved batch(es)
    python batch_utils.py --wait --download results.jsonl
    python batch_utils.py --run --wait --download results.jsonl --poll_interval 60
    python batch_utils.py --retry_failed retry.jsonl --file batchinput.jsonl
    python batch_utils.py --run --file retry.jsonl --wait --download results-retry.jsonl
    python batch_utils.py --run --wait --download results.jsonl --max_enqueued_tokens 2000000 \
        --input_price 0.075 --output_price 0.30 --max_cost 20    # a large split input, paced and priced
    python batch_utils.py                             # list recent batches

The key comes from ./openai.tok (or --key_file FILE), else OPENAI_API_KEY; it is never
printed. --base_url (or OPENAI_BASE_URL) points at any OpenAI-compatible Batch API.
--run checks the file locally first (line shape, one url, one model, unique ids, 50,000
requests / 200 MB), then uploads it and creates the batch; when create_batchinput.py
split the input into STEM.part-NNN.jsonl files, each part becomes its own batch. It
refuses a file whose content already has a batch that is running or completed (its
sha256 is in the batch metadata; --force submits it again). The ids go to
last_batch_id.tok, one per line, and every other action uses them unless --id is given;
the --run of a --retry_failed file adds its ids beside the originals. --download writes
OUTPUT with the output lines of every batch (in the API's order: join on custom_id) and
OUTPUT.errors.jsonl with the requests that failed, expired or were cancelled, and
OUTPUT.source.json saying which batches and input file (name, sha256) they came from; all
are complete or absent. It refuses an OUTPUT that is a batch input, or that holds the
results of other batches (a rerun for the same batches replaces it). Every batch --run creates is also listed in
last_batch_id.history.jsonl, so an earlier run's batches are found after a later --run.

--run --wait is a queue for inputs of any number of parts: it submits the parts that fit
the model's enqueued-token limit and the rest as earlier batches end (a part refused with
token_limit_exceeded waits for the next one to end; --max_enqueued_tokens N states the
limit so that none is refused), then merges every part's results into OUTPUT. Tokens are
estimated as input characters / 4 (rounded up) plus each request's output cap. Its state
is in last_batch_id.manifest.json, beside the ids file: rerun the same command after a
crash, a kill or Ctrl+C and it continues, never submitting a part twice; --check shows
the queue. When the batches end it prints the tokens they used (and the cost, given
--input_price/--output_price per 1M tokens); --max_cost USD refuses a --run whose input is
estimated over USD.

Exit status: 0 done (with --wait: every batch completed); 3 a batch failed (its input
was refused); 4 a batch expired; 5 a batch was cancelled; 1 any other error, one line on
stderr; 2 bad usage; 130 Ctrl+C (waiting stops, the batches go on).
"""

from __future__ import annotations

import sys

from datagen import cli, openai_batch


def build_parser():
    parser = cli.make_parser(__doc__, prog="batch_utils.py")
    openai_batch.add_batch_args(parser)
    cli.add_logging_args(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    return cli.run(parser, lambda args: openai_batch.run_command(args, parser), argv)


if __name__ == "__main__":
    sys.exit(main())
