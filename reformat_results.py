#!/usr/bin/env python3
"""Bring both routes' raw results into one clean, complete, ordered table. (the code: datagen/results/reformat_results.py)."""

import sys

from datagen.results.reformat_results import main

if __name__ == "__main__":
    sys.exit(main())
