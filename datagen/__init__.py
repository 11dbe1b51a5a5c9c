"""datagen: the package behind the four data-generation scripts.

The routes are its folders: ``common/`` (shared input and file handling), ``batchapi/``
(the OpenAI Batch API route), ``finetuned/`` (the fine-tuned route and its engines),
``results/`` (both routes' results into one table), ``cache/`` (the answer cache both routes
share); the offline stand-ins (``local_batch_server/``, ``tinymodel.py``, ``demo.py``) serve
the tests and the demo. The one map of every module is docs/development.md's Layout.
"""

__version__ = "0.1.0"
