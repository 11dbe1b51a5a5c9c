"""The seam between the engine-independent generation run and the engines.

``datagen.finetuned.generation`` reads requests, renders prompts (chat template) and tokenizes
them once, decides the effective parameters, resumes, shards and writes records. It
hands an engine (``datagen.finetuned.engine_hf``: Hugging Face ``generate``; ``datagen.finetuned.engine_vllm``:
vLLM) one lazy iterator of ``Job``s, every pending (request, adapter) pair of the run;
the engine schedules them itself and yields each job's samples as soon as they are done,
in any order. Both engines get exactly the same token ids, so their outputs can be
compared token for token. The run imports nothing from an engine module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from datagen.common.params import GenParams

BASE = "base"  # the run name of the base model's own answers (and its output file's, with --with_base)


@dataclass
class Sample:
    """One generated answer to one prompt."""

    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the new tokens, as counted in completion_tokens
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top_logprobs": [...]} (OpenAI's shape)


@dataclass
class Job:
    """One (request, adapter) pair of a run, ready for an engine."""

    item: Any  # the run's own handle, returned untouched
    input_ids: list[int]  # the prompt's token ids, rendered and tokenized by the run
    params: GenParams  # effective parameters of this request (``GenParams.effective``)
    adapter: str | None  # which adapter answers (None: the base model)
    seed: int  # this request's seed: request_seed(run seed, custom_id), made by the run


def request_seed(seed: int, custom_id: str) -> int:
    """The seed of one request, from the run's seed and its ``custom_id`` (a 63-bit int): a
    request samples the same way whatever runs beside it, and seeds of different requests
    are far apart (vLLM gives a request's k-th sample the seed + k)."""
    digest = hashlib.sha256(f"{seed}\0{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cut_at_stop(text: str, stops: Iterable[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (not included), and whether one was found."""
    best = None
    for stop in stops:
        pos = text.find(stop)
        if pos >= 0 and (best is None or pos < best):
            best = pos
    return (text, False) if best is None else (text[:best], True)


class Engine(Protocol):
    """What the run needs of an engine."""

    name: str  # "hf" | "vllm": in every record's engine field and its fingerprint
    model_name: str  # the base model as given
    context_length: int | None  # positions the model takes (prompt + new tokens), None if unknown
    adapters: list  # what can answer: adapter names, and None for the base model alone

    def provenance(self, adapter: str | None) -> Any:
        """The ``records.Provenance`` of records answered by ``adapter`` (model, adapter and
        engine identity: name, dtype, merged, versions, and "decoding": how it decodes and seeds)."""

    def tokenizer_for(self, adapter: str | None) -> Any:
        """The Hugging Face tokenizer of ``adapter``'s prompts and answers (its own, else the base's)."""

    def stream(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, list[Sample] | RequestRejected]]:
        """Answer every job; yield (job, samples) or (job, RequestRejected) as each finishes.

        ``jobs`` is lazy: the engine takes as many as it schedules at once. Each job gets
        ``job.params.n`` samples. The run has checked each prompt's
        length against ``context_length``; a job the engine refuses is yielded with its
        ``RequestRejected`` (the run writes a failed record), the others go on."""


class RequestRejected(Exception):
    """An engine refused one request (the run writes it as a failed record)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
