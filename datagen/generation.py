"""The fine-tuned route's run, the same for every engine: prompts to token ids, resume,
failed records, progress, records.

1. ``Renderer`` turns requests into the exact token ids the model sees: conversations
   (and plain prompts, when the tokenizer has a template) through the chat template,
   rendered as text and tokenized without a second BOS. Both engines get these ids.
2. ``run_generation`` checks the records already in the output against what this run
   would make (``datagen.records`` fingerprints) and refuses, or regenerates exactly the
   mismatched ones; then hands the engine one lazy stream of ``Job``s, every pending
   (request, adapter) pair with its effective parameters, token ids and seed
   (``datagen.engine.request_seed``), tokenized ``ENCODE_CHUNK`` requests at a time. The
   engine decides what runs together (vLLM: its scheduler; Hugging Face: length-sorted
   batches) and yields each job's samples as it finishes; the run appends that record at
   once. A prompt too long for the context, one the chat template refuses, or one the
   engine refuses is a failed record. Once all are done each file is rewritten in input
   order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import records
from datagen.engine import Engine, GenParams, Job, RequestRejected, Sample, request_seed
from datagen.errors import UserError, first_line
from datagen.inputs import BASE, Overrides, Request, describe, effective_params
from datagen.jsonl import AppendJsonl
from datagen.records import exclusive, restore_input_order

log = logging.getLogger("datagen")

ENCODE_CHUNK = 1024  # requests tokenized together (one tokenizer call per kind of prompt) as the engine asks
VERIFY_CHUNK = 1024  # resume: requests already done, tokenized this many at a time to check their input
SYNC_SECONDS = 1.0  # records reach the file as each finishes; fsync at most this often (and at the end)


# --- prompts to token ids ------------------------------------------------------------


class Renderer:
    """The exact token ids of each request, for every engine alike."""

    def __init__(self, tokenizer, use_chat_template: str = "auto", model_name: str = "the model"):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.model_name = model_name
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template == "always" and not self.has_template:
            raise UserError(f"--use_chat_template always: {model_name} has no chat template; "
                            "use --use_chat_template never or a tokenizer that has one")

    def wants_chat(self, request: Request) -> bool:
        """Conversations always use the chat template; plain text does when the tokenizer has
        one (auto), except /v1/completions batch lines, which are raw text by definition."""
        if request.messages is not None:
            if self.use_chat_template == "never":
                raise UserError(f"{request.where}: a conversation needs the chat template; "
                                "drop --use_chat_template never")
            return True
        if self.use_chat_template == "always":
            return True
        if self.use_chat_template == "never" or request.raw:
            return False
        return self.has_template

    def encode(self, request: Request) -> list[int]:
        """Token ids of the prompt; the chat template renders conversations, without a second BOS."""
        ids = self.encode_many([request])[0]
        if isinstance(ids, RequestRejected):
            raise UserError(f"{request.where}: {ids.message}")
        return ids

    def encode_many(self, requests: list[Request]) -> list[list[int] | RequestRejected]:
        """``encode`` for each request, in one tokenizer call per kind of prompt: a fast
        tokenizer encodes a list in parallel, in one call from Python. A conversation the
        chat template refuses comes back as ``RequestRejected`` (a failed record, not a failed run)."""
        result: list[list[int] | RequestRejected | None] = [None] * len(requests)
        plain, chat, rendered = [], [], []
        for pos, request in enumerate(requests):
            if not self.wants_chat(request):
                plain.append(pos)
                continue
            try:
                rendered.append(self._render_chat(request))
                chat.append(pos)
            except RequestRejected as exc:
                result[pos] = exc
        if plain:
            encoded = self.tokenizer([requests[pos].text for pos in plain], add_special_tokens=True)["input_ids"]
            for pos, ids in zip(plain, encoded):
                result[pos] = ids
        if chat:
            # The rendered text already holds the template's BOS: add no second one.
            encoded = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            for pos, ids in zip(chat, encoded):
                result[pos] = ids
        return result

    def _render_chat(self, request: Request) -> str:
        if not self.has_template:
            raise UserError(f"{request.where}: {self.model_name} has no chat template, so it cannot "
                            "take a conversation; give plain text prompts (--prompt_field) or a tokenizer "
                            "with a chat template")
        messages = request.messages if request.messages is not None else [{"role": "user", "content": request.text}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors, e.g. a template that refuses a system turn
            raise RequestRejected("chat_template_error", f"the chat template refused this conversation "
                                  f"({first_line(exc)})") from None


def too_long(input_ids: list[int], params: GenParams, limit: int | None) -> RequestRejected | None:
    """The rejection of a prompt that, with its max new tokens, exceeds the model's context
    (as the OpenAI API and vLLM reject it), else None."""
    if limit is None or len(input_ids) + params.max_new_tokens <= limit:
        return None
    return RequestRejected("context_length_exceeded",
                           f"this model's maximum context length is {limit} tokens, but the request has "
                           f"{len(input_ids)} prompt tokens + {params.max_new_tokens} max new tokens "
                           f"= {len(input_ids) + params.max_new_tokens}; shorten the prompt or lower "
                           "max_tokens (--max_new_tokens)")


# --- the run -----------------------------------------------------------------------


@dataclass
class RunStats:
    total: int = 0  # requests in this shard
    skipped: int = 0  # already in the output
    done: int = 0  # generated in this run
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    failed: Counter = field(default_factory=Counter)  # failed records written, by error code
    targets: list = field(default_factory=list)  # the run's Targets: per output, generated/skipped/failed


@dataclass
class Target:
    """One output of a run: an adapter (None: the base model alone) and the file it answers into."""

    adapter: str | None
    output: Path  # as the user named it
    renderer: Renderer | None = None  # its adapter's tokenizer and chat template (else the base's)
    real: Path | None = None  # its real path (through any symlink), set under the lock
    done: set[str] = field(default_factory=set)  # ids whose records are already there and reused
    sink: AppendJsonl | None = None
    provenance: records.Provenance | None = None
    generated: int = 0
    skipped: int = 0
    failed: Counter = field(default_factory=Counter)


    @property
    def run(self) -> str:
        """The run's name, as its records carry it: the adapter's NAME, or "base"."""
        return self.adapter if self.adapter is not None else BASE


@dataclass
class BeforeLoading:
    """What a run knows before the model's weights load (``datagen.model_files``): enough to
    lock, check the records already there (fingerprints need tokenizers and file hashes, not
    weights) and find out whether anything is left to do. ``run_generation`` takes it with
    ``load_engine``, which it calls only when there is work."""

    files: Any  # model_files.ModelFiles
    engine_identity: dict  # the engine's part of the provenance (name, dtype, merged, versions)
    adapters: list  # what will answer: adapter names, None for the base model

    @property
    def model_name(self) -> str:
        return self.files.model_name

    def provenance(self, adapter: str | None) -> records.Provenance:
        return self.files.provenance(adapter, self.engine_identity)

    def tokenizer_for(self, adapter: str | None):
        return self.files.tokenizer_for(adapter)


def run_generation(engine, requests, outputs, overrides: Overrides, *, ids: list[str] | None = None,
                   renderer: Renderer | None = None, use_chat_template: str = "auto", reorder: bool = True,
                   show_progress: bool = True, regenerate_mismatched: bool = False, load_engine=None) -> RunStats:
    """Generate every request not yet in each output, appending one record per request.

    ``engine`` is an engine, or (with ``load_engine``, a function that loads and returns
    one) a ``BeforeLoading``: then the lock, the check of the records already there and
    "nothing to do" are all decided before the weights load. ``outputs`` is one path
    (answered by the engine's only adapter, or the base model) or a dict ``{adapter name or
    None: path}``: all of them are answered in one stream, each adapter's prompts rendered
    and tokenized with its own tokenizer and chat template when it has them.
    ``requests`` is a list, or a function that streams them anew on each call (then
    ``ids``, their ``custom_id``s in order as ``check_requests`` returns them, must be
    given); a one-shot iterator is read into a list. Records already in an output are
    reused only when their fingerprint matches what this run would make; otherwise the
    run refuses before generating anything, or with ``regenerate_mismatched`` moves exactly
    those records to ``OUTPUT.replaced`` and makes them again. The rest go to the engine
    as one lazy stream of jobs (``Engine.stream``); each record is appended as its job
    finishes. A request the engine rejects becomes a failed record.
    """
    from datagen.cli import progress

    if not callable(requests):
        listed = list(requests)
        requests = lambda: listed  # noqa: E731
    if ids is None:
        ids = [r.custom_id for r in requests()]
    if not isinstance(outputs, dict):
        named = [adapter for adapter in engine.adapters if adapter is not None]
        if len(named) > 1:
            raise ValueError("several adapters: give run_generation one output per adapter")
        outputs = {named[0] if named else None: outputs}
    renderers: dict[int, Renderer] = {}
    targets = []
    for adapter, path in outputs.items():
        tokenizer = engine.tokenizer_for(adapter)
        target_renderer = renderer or renderers.setdefault(
            id(tokenizer), Renderer(tokenizer, use_chat_template, engine.model_name))
        targets.append(Target(adapter, Path(path), target_renderer, provenance=engine.provenance(adapter)))
        files = getattr(engine, "files", None)
        log.info("run %s: %s -> %s", targets[-1].run, files.describe(adapter) if files else "its tokenizer", path)
    stats = RunStats(total=len(ids) * len(targets))
    with contextlib.ExitStack() as stack:
        for target in targets:
            target.real = stack.enter_context(exclusive(target.output))
        for target in targets:
            target.done = _check_resume(target, requests(), overrides, regenerate_mismatched)
            target.skipped = sum(1 for custom_id in ids if custom_id in target.done)
            if target.skipped:
                log.info("resuming run %s: %d of %d requests already in %s, made as this run would make them; "
                         "%d to go", target.run, target.skipped, len(ids), target.output, len(ids) - target.skipped)
        stats.skipped = sum(t.skipped for t in targets)
        todo = stats.total - stats.skipped
        stats.targets = targets
        if todo == 0:
            return stats
        if load_engine is not None:
            engine = _loaded(load_engine, targets)
        log.info("%d requests to answer%s", todo,
                 f" ({len(ids)} prompts x {len(targets)} outputs)" if len(targets) > 1 else "")
        run = _Run(engine, overrides, stats, targets)
        run.bar = progress(total=todo, desc="generating", unit="req", **({} if show_progress else {"disable": True}))
        try:
            for target in targets:
                target.sink = stack.enter_context(AppendJsonl(target.real, sync_interval=SYNC_SECONDS))
            for job, result in engine.stream(run.jobs(requests())):
                run.finished(job, result)
        finally:
            run.bar.close()
            stats.seconds = time.monotonic() - run.started
            for target in targets:
                if target.sink is not None:
                    target.sink.close()
        if reorder:
            for target in targets:
                if target.generated or sum(target.failed.values()):
                    restore_input_order(target.real, ids)
    return stats


def _loaded(load_engine, targets: list[Target]):
    """Load the engine; its records must be made as the checks before loading assumed."""
    engine = load_engine()
    for target in targets:
        provenance = engine.provenance(target.adapter)
        if provenance.static_parts() != target.provenance.static_parts():
            raise RuntimeError(f"run {target.run}: the loaded engine's provenance differs from the one checked "
                               "before loading")
        target.provenance = provenance
    return engine


def _check_resume(target: Target, requests, overrides: Overrides, regenerate: bool) -> set[str]:
    """The ids whose records in ``target``'s output this run reuses (see ``run_generation``)."""
    check = records.ResumeCheck(target.real, shown=target.output, run=target.run)
    if not check.records:
        return set()
    checked = 0
    pending: list[Request] = []

    def verify(batch: list[Request]) -> None:
        for request, input_ids in zip(batch, target.renderer.encode_many(batch)):
            params = effective_params(request, overrides)
            check.compare(request.custom_id, records.fingerprint(target.provenance, params.record(),
                                                                 _input_hash(request, input_ids)))

    for request in requests:
        if request.custom_id in check:
            checked += 1
            pending.append(request)
            if len(pending) >= VERIFY_CHUNK:
                verify(pending)
                pending = []
    verify(pending)
    if check.mismatched:
        if not regenerate:
            raise UserError(check.refusal(checked))
        moved = records.move_out(target.real, set(check.mismatched))
        log.warning("--regenerate_mismatched: moved %d records made differently to %s; making them again",
                    len(check.mismatched), moved)
    return set(check.records) - set(check.mismatched)


def _input_hash(request: Request, input_ids) -> str:
    """The hash of what the model saw: its token ids (or, rejected before tokenizing, the request)."""
    return records.input_digest(input_ids if isinstance(input_ids, list) else None, [request.text, request.messages])


class _Run:
    """The state of one run while it generates: engine, targets, counters, progress."""

    def __init__(self, engine: Engine, overrides: Overrides, stats: RunStats, targets: list[Target]):
        self.engine, self.overrides, self.stats, self.targets = engine, overrides, stats, targets
        self.warned: set = set()  # parameters already described or warned about
        self.started = time.monotonic()
        self.bar = None

    def jobs(self, requests: Iterable[Request]) -> Iterator[Job]:
        """Every pending (request, target) pair as a ``Job``, tokenized ``ENCODE_CHUNK``
        requests at a time as the engine takes them; within a chunk, in input order, one
        target after another."""
        chunk: list[Request] = []
        for request in requests:
            if any(request.custom_id not in target.done for target in self.targets):
                chunk.append(request)
                if len(chunk) >= ENCODE_CHUNK:
                    yield from self._jobs_of(chunk)
                    chunk = []
        yield from self._jobs_of(chunk)

    def _jobs_of(self, chunk: list[Request]) -> Iterator[Job]:
        """A chunk's jobs; a prompt the chat template refuses or too long for the context is
        written as a failed record here instead. Each request is tokenized once per
        tokenizer (targets without their own share the base's)."""
        params_of = [effective_params(request, self.overrides) for request in chunk]
        self._describe(chunk, params_of)
        encoded: dict[int, list] = {}
        for target in self.targets:
            if id(target.renderer) not in encoded:
                encoded[id(target.renderer)] = target.renderer.encode_many(chunk)
        # One target's jobs after another: vLLM then runs mostly one adapter a step. Jobs
        # interleaved per request (every step mixing two adapters and the base) ran at 0.58x
        # the speed of three plain runs on vLLM's CPU build; grouped, 1.0-1.8x (bench/README.md).
        for target in self.targets:
            for pos, (request, params) in enumerate(zip(chunk, params_of)):
                if request.custom_id in target.done:
                    continue
                seed = request_seed(params.seed, request.custom_id)
                ids = encoded[id(target.renderer)][pos]
                rejected = ids if isinstance(ids, RequestRejected) else too_long(ids, params, self.engine.context_length)
                if rejected is None:
                    yield Job((request, target), ids, params, target.adapter, seed)
                else:
                    self._write_failed(request, target, params, ids if isinstance(ids, list) else None, rejected)

    def _describe(self, chunk: list[Request], params_of: list[GenParams]) -> None:
        """Log each new set of parameters once, with what it means."""
        for params in dict.fromkeys(params_of):
            if params in self.warned:
                continue
            self.warned.add(params)
            defaulted = len({request.custom_id for request, p in zip(chunk, params_of) if p == params
                             and self.overrides.temperature is None and request.params.get("temperature") is None})
            log.info("decoding: %s%s", describe(params),
                     f" ({defaulted} requests set no temperature: the OpenAI API's default of 1 applies; "
                     "--temperature 0 for greedy)" if defaulted and params.do_sample else "")
            if params.num_return_sequences > 1 and not params.do_sample:
                log.warning("requests ask for n=%d with greedy decoding: their samples are identical; add "
                            "--do_sample or a temperature above 0 for different samples", params.num_return_sequences)
            warning = getattr(self.engine, "warning_for", lambda params: None)(params)
            if warning:
                log.warning("%s", warning)

    def finished(self, job: Job, result: list[Sample] | RequestRejected) -> None:
        """Append the record of a job the engine has answered (or refused)."""
        request, target = job.item
        if isinstance(result, RequestRejected):
            self._write_failed(request, target, job.params, job.input_ids, result)
            return
        target.sink.write(records.make_record(
            request.custom_id, result, len(job.input_ids), target.provenance, job.params.record(),
            records.input_digest(job.input_ids), int(time.time()), request.ignored, request.request_sha256))
        target.generated += 1
        stats = self.stats
        stats.completion_tokens += sum(sample.completion_tokens for sample in result)
        stats.prompt_tokens += len(job.input_ids)
        self._advance()

    def _write_failed(self, request: Request, target: Target, params: GenParams, input_ids: list[int] | None,
                      rejected: RequestRejected) -> None:
        target.sink.write(records.failed_record(
            request.custom_id, rejected.code, rejected.message, len(input_ids) if input_ids is not None else None,
            target.provenance, params.record(), _input_hash(request, input_ids), int(time.time()),
            request.request_sha256))
        target.failed[rejected.code] += 1
        self.stats.failed[rejected.code] += 1
        if sum(self.stats.failed.values()) <= 3:
            log.warning("%s: failed (%s): %s", request.where, rejected.code, rejected.message)
        self._advance()

    def _advance(self) -> None:
        self.stats.done += 1
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.stats.completion_tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(1)
