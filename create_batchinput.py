#!/usr/bin/env python3
"""Turn a prompts file into OpenAI Batch API input lines (batchinput.jsonl). (the code: datagen/batchapi/create_batchinput.py)."""

import sys

from datagen.batchapi.create_batchinput import main

if __name__ == "__main__":
    sys.exit(main())
