#!/usr/bin/env python3
"""Submit, watch and download OpenAI batches: the whole Batch API lifecycle.

    python batch_utils.py --run --file batchinput.jsonl --description "gpt-4o-mini, eval v2"
    python batch_utils.py --check                     # status of the saved batch(es)
    python batch_utils.py --wait --download results.jsonl
    python batch_utils.py --run --wait --download results.jsonl --poll_interval 60
    python batch_utils.py --retry_failed retry.jsonl --file batchinput.jsonl
    python batch_utils.py --run --file retry.jsonl --wait --download results-retry.jsonl
    python batch_utils.py --run --wait --download results.jsonl --max_enqueued_tokens 2000000 \\
        --input_price 0.075 --output_price 0.30 --max_cost 20    # a large split input, paced and priced
    python batch_utils.py                             # list recent batches

The key comes from ./openai.tok (or --key_file), else OPENAI_API_KEY. Batch ids are kept
in last_batch_id.tok; --run --wait paces a split input under the enqueued-token limit and
resumes after a crash. Requests the answer cache holds are not sent again: --download
writes their answers beside the new ones (--no_cache turns it off). Exit status: 0 done,
3 failed, 4 expired, 5 cancelled, 1 other error, 2 bad usage, 130 Ctrl+C. Everything
else: docs/batch_utils.md.
"""

from __future__ import annotations

import sys

from datagen.common import cli
from datagen.batchapi import openai_batch


def build_parser():
    parser = cli.make_parser(__doc__, prog="batch_utils.py",
                             usage="%(prog)s [--run | --check | --wait | --download FILE | ...] [options]")
    openai_batch.add_batch_args(parser)
    cli.add_logging_args(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    return cli.run(parser, lambda args: openai_batch.run_command(args, parser), argv)


if __name__ == "__main__":
    sys.exit(main())
