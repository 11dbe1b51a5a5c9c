"""The seam between the engine-independent generation run and the engines.

``datagen.generation`` reads requests, renders prompts (chat template) and tokenizes
them once, decides the effective parameters, resumes, shards and writes records. An
engine (``datagen.engine_hf``: Hugging Face ``generate`` and our greedy loop;
``datagen.engine_vllm``: vLLM) only turns a batch of prompt token ids plus one set of
parameters into samples. Both engines get exactly the same token ids, so their outputs
can be compared token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# Defaults for parameters that neither the command line nor a batch line sets.
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: a batch line without a temperature is sampled at 1
DEFAULT_TOP_P = 1.0
DEFAULT_SEED = 0


@dataclass(frozen=True)
class GenParams:
    """The effective parameters of one request; requests batch together only when equal."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float | None = None  # None when greedy
    top_p: float | None = None  # None when greedy
    seed: int = DEFAULT_SEED
    num_return_sequences: int = 1
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # return the chosen tokens' log-probabilities
    top_logprobs: int = 0  # and this many alternatives per position
    json_schema: str | None = None  # structured output: a JSON schema (canonical JSON text), or "{}" for any JSON

    def record(self) -> dict:
        """The parameters as a record's ``generation`` field shows them (and its fingerprint
        hashes them); the engine's own settings (dtype, merged) are in its ``engine`` field."""
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
               "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
               "num_return_sequences": self.num_return_sequences, "stop": list(self.stop)}
        if self.logprobs:
            out.update(logprobs=True, top_logprobs=self.top_logprobs)
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        return out


@dataclass
class Sample:
    """One generated answer to one prompt."""

    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the new tokens, as counted in completion_tokens
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top_logprobs": [...]} (OpenAI's shape)


class Engine(Protocol):
    """What the run needs of an engine."""

    name: str  # "hf" | "vllm": in every record's engine field and its fingerprint
    model_name: str  # the base model as given
    tokenizer: Any  # a Hugging Face tokenizer: the run renders and tokenizes with it
    context_length: int | None  # positions the model takes (prompt + new tokens), None if unknown
    adapters: list  # what can answer: adapter names, and None for the base model alone

    def provenance(self, adapter: str | None) -> Any:
        """The ``records.Provenance`` of records answered by ``adapter`` (model, adapter and
        engine identity: name, dtype, merged, versions)."""

    def generate(self, prompts: list[list[int]], params: GenParams, adapters: list[str | None],
                 seed: int) -> list[list[Sample]]:
        """For each prompt (token ids), answered by its entry of ``adapters``,
        ``params.num_return_sequences`` samples, in order. ``seed`` seeds this batch's
        sampling. The run has checked each prompt's length against ``context_length``.
        ``RequestRejected`` for a request the engine refuses: the run then retries the
        batch's requests one by one and writes the refused one as a failed record."""


class RequestRejected(Exception):
    """An engine refused one request (the run writes it as a failed record)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
