"""datagen: the shared helper package behind the four data-generation scripts.

One home for each file format and each shared flag:

- ``errors``              UserError, the one exception type that becomes a one-line message
- ``jsonl``               the JSON codec, streaming JSONL reading (file:line errors), atomic writes
- ``cli``                 the shared ``main()`` wrapper, logging, progress bars, flag helpers
- ``prompts``             prompts files of every supported kind, read as a stream of records
- ``batchfile``           OpenAI Batch API input lines: endpoints, bodies, limits, part files
- ``openai_batch``        the Batch API lifecycle behind batch_utils.py (key and id files too)
- ``local_batch_server``  a local stand-in of the Files + Batches API (tests and the demo)
- ``generation``          the Hugging Face + LoRA engine behind generate_data_finetuned.py
- ``kvcache``             the greedy loop's KV cache, which writes each token in place
- ``tinymodel``           tiny models and LoRA adapters built on the spot (tests and the demo)
- ``results``             raw results of both routes into one schema (reformat_results.py)
- ``compare``             runs of either route side by side, joined on the id (--compare)
- ``demo``                ``make demo``: both routes end to end, offline

``pip install .`` (pyproject.toml) installs this package, the four scripts as modules and
the commands datagen-create-batchinput, datagen-batch-utils, datagen-generate-finetuned,
datagen-reformat-results, datagen-local-batch-server and datagen-tinymodel.
"""

__version__ = "0.1.0"
