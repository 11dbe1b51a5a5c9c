#!/usr/bin/env python3
"""Submit, watch and download OpenAI batches: the whole Batch API lifecycle. (the code: datagen/batchapi/batch_utils.py)."""

import sys

from datagen.batchapi.batch_utils import main

if __name__ == "__main__":
    sys.exit(main())
