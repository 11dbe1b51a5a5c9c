"""datagen: the shared helper package behind the four data-generation scripts.

One home for each file format and each shared flag:

- ``errors``     UserError, the one exception type that becomes a one-line message
- ``jsonl``      streaming JSONL reading (errors name file:line) and atomic writes
- ``cli``        the shared ``main()`` wrapper, logging and shared argparse pieces
- ``prompts``    prompts files of every supported kind, read as a stream of records
- ``batchfile``  OpenAI Batch API input lines: endpoints, bodies, limits, part files
"""

__version__ = "0.1.0"
