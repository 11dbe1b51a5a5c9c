"""The local stand-in for the OpenAI Files + Batches API (tests and the demo; NOT OpenAI):
``server`` (state, steps, faults), ``http`` (its HTTP front), ``validate`` (its check of an
input file), ``answers`` (its fake answers); ``python -m datagen.local_batch_server`` serves it."""

from datagen.local_batch_server.server import BANNER, LocalBatchServer

__all__ = ["BANNER", "LocalBatchServer"]
