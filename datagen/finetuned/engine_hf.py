"""The Hugging Face engine: a stream of jobs answered with transformers' own ``generate``.

``HFEngine.stream(jobs)`` is the engine protocol of ``datagen.finetuned.engine``. What the engine adds
to ``model.generate`` is the batching, which ``generate`` leaves to its caller:

- it takes ``WINDOW`` jobs at a time, groups them by (parameters, adapter), sorts each group
  by prompt length (longest first, so an out-of-memory error shows early) and cuts it into
  batches (``plan_batches``): ``batch_size`` rows of the longest prompts, and as many shorter
  ones as fit the same token budget (``max_batch_tokens``);
- each batch is one ``model.generate`` call with left padding; the adapter is merged into the
  weights when one adapter runs (``datagen.finetuned.hf_model``), else the PeftModel switches adapters
  per batch over one copy of the base;
- an out-of-memory error halves the batch size and the budget for the rest of the run;
- sampling seeds one random stream per batch from the batch's job seeds, so a request's
  samples depend on which requests share its batch (the records' engine field says so:
  ``hf_model.DECODING``).

EOS is the answering adapter's tokenizer's (and the model's); stop strings go to ``generate``
and are cut from the text, completion tokens counted up to the stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from itertools import islice
from typing import Iterable, Iterator

from datagen.common.params import GenParams
from datagen.finetuned.engine import Job, RequestRejected, Sample, cut_at_stop
from datagen.common.errors import UserError
from datagen.finetuned.hf_model import LoadedModel, peft_name

log = logging.getLogger("datagen")

WINDOW = 8192  # jobs taken from the stream, grouped and sorted by length together (bounds memory)
BUDGET_ROWS_FACTOR = 8  # with a token budget, a batch holds at most this many times batch_size prompts


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def plan_batches(jobs: list, batch_size: int, max_new_tokens: int = 0,
                 max_batch_tokens: int | None = 0) -> list[list]:
    """Sort by prompt length (longest first; ties keep their order) and cut into batches
    (of ``Job``s, or anything with ``input_ids``).

    ``max_batch_tokens`` 0: batches of ``batch_size`` prompts. Otherwise a token budget
    (lm-eval-harness / vLLM style): a batch takes prompts while its rows times (its
    longest prompt + ``max_new_tokens``), the KV cache it holds at the end, stay within
    the budget, so short prompts go in bigger batches (at most ``BUDGET_ROWS_FACTOR`` x
    ``batch_size`` rows). ``None`` (auto): the budget is what ``batch_size`` rows of the
    longest prompt take, so no batch holds a larger KV cache than a plain batch of
    ``batch_size`` prompts would at its largest.
    """
    ordered = sorted(jobs, key=lambda job: -len(job.input_ids))
    if max_batch_tokens == 0 or not ordered:
        return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if max_batch_tokens is None:
        max_batch_tokens = batch_size * (len(ordered[0].input_ids) + max_new_tokens)
    max_rows = BUDGET_ROWS_FACTOR * batch_size
    batches: list[list] = []
    current: list = []
    for job in ordered:
        width = len(current[0].input_ids) if current else len(job.input_ids)  # longest first
        if current and (len(current) >= max_rows or (len(current) + 1) * (width + max_new_tokens) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(job)
    batches.append(current)
    return batches


def batch_seed(seeds: list[int]) -> int:
    """The seed of one batch's random stream, from its jobs' seeds in batch order: the same
    batch samples the same way in every run; another batch draws other numbers."""
    digest = hashlib.sha256("\n".join(map(str, seeds)).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class HFEngine:
    """Answers a stream of jobs on a loaded Hugging Face model (the engine protocol of
    ``datagen.finetuned.engine``), in length-sorted batches of ``batch_size`` rows of the longest
    prompts within a token budget (``max_batch_tokens``: None auto, 0 off, else tokens)."""

    name = "hf"

    def __init__(self, loaded: LoadedModel, batch_size: int = 32, max_batch_tokens: int | None = None,
                 window: int = WINDOW):
        if batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 0:
            raise UserError(f"--max_batch_tokens must be 0 (off), auto or a positive number, got {max_batch_tokens}")
        self.loaded = loaded
        self.files = loaded.files  # config, tokenizers (the base's and each adapter's), adapters
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size  # halved on out-of-memory, for the rest of the run
        self.max_batch_tokens = max_batch_tokens  # likewise (when a number)
        self.window = window
        self.batches = 0  # batches generated
        self.pad_tokens = 0  # pad tokens in them (what sorting by length saves)

    @property
    def context_length(self) -> int | None:
        """Positions the model takes, prompt and new tokens together (None: unknown)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    @property
    def model_name(self) -> str:
        return self.loaded.model_name

    @property
    def adapters(self) -> list[str | None]:
        """What can answer: each adapter by name, and the base model (None) unless an adapter
        is merged into it."""
        names: list[str | None] = list(self.loaded.adapters)
        return names if self.loaded.merged else names + [None]

    def provenance(self, adapter: str | None):
        return self.loaded.provenance(adapter)

    def tokenizer_for(self, adapter: str | None):
        """The tokenizer of ``adapter``'s prompts and answers: its own, else the base's."""
        return self.loaded.files.tokenizer_for(adapter)

    # -- the stream

    def stream(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, list[Sample] | RequestRejected]]:
        """The engine protocol (``datagen.finetuned.engine.Engine``): every job answered, each batch's
        jobs yielded as soon as the batch is done."""
        jobs = iter(jobs)
        budget = "auto" if self.max_batch_tokens is None else self.max_batch_tokens or "off"
        log.info("hf engine: model.generate on length-sorted batches of up to %d of the longest prompts "
                 "(token budget %s)", self.batch_size, budget)
        while window := list(islice(jobs, self.window)):
            groups: dict[tuple, list[Job]] = {}
            for job in window:
                groups.setdefault((job.params, job.adapter), []).append(job)
            for (params, adapter), group in groups.items():
                yield from self._run_group(group, params, adapter)

    def _run_group(self, group: list[Job], params: GenParams, adapter: str | None):
        pending = plan_batches(group, self.batch_size, params.max_tokens, self.max_batch_tokens)
        while pending:
            batch = pending.pop(0)
            try:
                with self._using(adapter):
                    results = self.generate_batch([job.input_ids for job in batch], params,
                                                  batch_seed([job.seed for job in batch]), adapter)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                pending = self._halve(batch, pending, params)
                continue
            width = max(len(job.input_ids) for job in batch)
            self.batches += 1
            self.pad_tokens += sum(width - len(job.input_ids) for job in batch)
            yield from zip(batch, results)

    def _halve(self, batch: list[Job], pending: list[list[Job]], params: GenParams) -> list[list[Job]]:
        """After an out-of-memory error: halve the batch size (and token budget), plan again."""
        _free_memory()
        if len(batch) == 1:
            raise UserError(f"out of memory even at batch size 1 ({len(batch[0].input_ids)} prompt tokens + "
                            f"{params.max_tokens} new); lower --max_new_tokens, use --dtype bfloat16, or "
                            "spread the model over more GPUs with --device_map auto") from None
        # A token-budget batch can hold more than batch_size short prompts: halve what
        # failed, rows and budget alike.
        self.batch_size = max(1, min(self.batch_size, len(batch)) // 2)
        if self.max_batch_tokens:
            failed = len(batch) * (max(len(job.input_ids) for job in batch) + params.max_tokens)
            self.max_batch_tokens = max(1, min(self.max_batch_tokens, failed) // 2)
        log.warning("out of memory at batch size %d; halving to %d", len(batch), self.batch_size)
        rest = [job for jobs in [batch] + pending for job in jobs]
        return plan_batches(rest, self.batch_size, params.max_tokens, self.max_batch_tokens)

    @contextlib.contextmanager
    def _using(self, adapter: str | None):
        """Switch the PeftModel to ``adapter``, or turn the adapters off for the base model."""
        if adapter not in self.adapters:
            raise ValueError(f"{adapter!r} is not one of this engine's adapters {self.adapters}")
        if self.loaded.merged or not self.loaded.adapters:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            if self.model.active_adapter != peft_name(adapter):
                self.model.set_adapter(peft_name(adapter))
            yield

    # -- one batch

    def generate_batch(self, batch_ids: list[list[int]], params: GenParams,
                       seed: int | None = None, adapter: str | None = None) -> list[list[Sample]]:
        """One ``model.generate`` call for a batch of token-id lists (left padded), with the
        adapter already active; per prompt, ``n`` samples in order.

        Sampling seeds torch's random stream with ``seed`` (default: ``params.seed``).
        ``adapter``'s tokenizer (its own, else the base's) decodes, and its EOS ends a row.
        """
        import torch

        tokenizer = self.tokenizer_for(adapter)
        eos_ids = self.eos_ids if tokenizer is self.tokenizer else _eos_ids(self.model, tokenizer)
        width = max(len(ids) for ids in batch_ids)
        input_ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        n = params.n
        sampled_n = n if params.do_sample else 1  # greedy: one answer, repeated
        kwargs = dict(max_new_tokens=params.max_tokens, do_sample=params.do_sample,
                      num_return_sequences=sampled_n, pad_token_id=self.pad_id,
                      eos_token_id=sorted(eos_ids) or None)
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            torch.manual_seed(params.seed if seed is None else seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tokenizer)
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids.to(self.loaded.device),
                                         attention_mask=attention.to(self.loaded.device), **kwargs)
        new_tokens = output[:, width:].tolist()
        results: list[list[Sample]] = []
        for row in range(len(batch_ids)):
            samples = [self._sample(new_tokens[row * sampled_n + j], params, tokenizer, eos_ids)
                       for j in range(sampled_n)]
            results.append(samples * (n // sampled_n))
        return results

    def _sample(self, tokens: list[int], params: GenParams, tokenizer, eos_ids: set[int]) -> Sample:
        """Tokens of one row into text: cut at the first EOS, then at the first stop string."""
        end = len(tokens)
        finish = "length"
        for pos, token in enumerate(tokens):
            if token in eos_ids:
                end, finish = pos + 1, "stop"
                break
        decode = lambda k: tokenizer.decode(tokens[:k], skip_special_tokens=True)  # noqa: E731
        text = decode(end)
        if params.stop:
            text, found = cut_at_stop(text, params.stop)
            if found:
                finish = "stop"
                # Completion tokens: the shortest prefix whose text holds the stop string.
                low, high = 1, end
                while low < high:
                    mid = (low + high) // 2
                    if cut_at_stop(decode(mid), params.stop)[1]:
                        high = mid
                    else:
                        low = mid + 1
                end = low
        return Sample(text, finish, end, list(tokens[:end]))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
