#!/usr/bin/env python3
"""Answer prompts with a Hugging Face base model and a LoRA adapter, in fast, resumable batches. (the code: datagen/finetuned/generate_data_finetuned.py)."""

import sys

from datagen.finetuned.generate_data_finetuned import main

if __name__ == "__main__":
    sys.exit(main())
