"""datagen: the shared helper package behind the four data-generation scripts.

One home for each file format and each shared flag:

- ``errors``              UserError, the one exception type that becomes a one-line message
- ``jsonl``               the JSON codec, streaming JSONL reading (file:line errors), atomic writes
- ``cli``                 the shared ``main()`` wrapper, signals, OS errors, logging, progress bars, flags
- ``params``              the OpenAI API's parameter types and ranges, checked in one place
- ``prompt_files``        prompts files of every supported kind, read as a stream of rows
- ``prompts``             rows into prompts: fields, templates, conversations; the prompt flags
- ``batchfile``           OpenAI Batch API input lines: endpoints, bodies, limits, part files
- ``estimates``           token estimates (the enqueued-token limit) and dollar figures
- ``openai_client``       the Batch API client: key file, batch-ids file, one-line API errors
- ``openai_batch``        the Batch API commands behind batch_utils.py
- ``batch_queue``         many parts within the enqueued-token limit, and the run's manifest
- ``provenance``          where downloaded results came from (``OUT.source.json``, the batch history),
                          and the check that they answer ``--batch_input``
- ``local_batch_server``  a local stand-in of the Files + Batches API (tests and the demo), over
                          ``local_batch_http`` (its HTTP front) and ``local_batch_answers`` (its fake answers)
- ``inputs``              the fine-tuned route's requests, parameters, shards and adapters
- ``generation``          its engine-independent run: rendering, one stream of jobs, resume, failed records
- ``records``             its records, fingerprints, resume check, the lock on the output
- ``model_files``         what a run checks and reads before any weights load: paths, tokenizers, adapters
- ``engine``              the engine protocol; ``hf_model`` + ``engine_hf`` (Hugging Face: LoRA
                          checks, length-sorted batches on ``generate``), ``engine_vllm`` (vLLM)
- ``tinymodel``           tiny models and LoRA adapters built on the spot (tests and the demo)
- ``results``             raw results of both routes into one schema (reformat_results.py), over
                          ``result_answers``, ``result_lines``, ``result_requests``, ``result_store``,
                          ``result_output``
- ``result_runs``         which run a result belongs to: one identity per run, its name
- ``compare``             runs of either route side by side, joined on the id (--compare)
- ``demo``                ``make demo``: both routes end to end, offline

``pip install .`` (pyproject.toml) installs this package, the four scripts as modules and
the commands datagen-create-batchinput, datagen-batch-utils, datagen-generate-finetuned,
datagen-reformat-results, datagen-local-batch-server and datagen-tinymodel.
"""

__version__ = "0.1.0"
