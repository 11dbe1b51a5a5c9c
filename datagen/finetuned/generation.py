"""The fine-tuned route's run, the same for every engine: prompts to token ids, resume,
failed records, progress, records.

1. ``Renderer`` turns requests into the exact token ids the model sees: conversations
   (and plain prompts, when the tokenizer has a template) through the chat template,
   rendered as text and tokenized without a second BOS. Both engines get these ids.
2. ``run_generation`` checks the records already in the output against what this run
   would make (``datagen.finetuned.records`` fingerprints) and refuses, or regenerates exactly the
   mismatched ones; then hands the engine one lazy stream of ``Job``s, every pending
   (request, adapter) pair with its effective parameters, token ids and seed
   (``datagen.finetuned.engine.request_seed``), tokenized ``ENCODE_CHUNK`` requests at a time. The
   engine decides what runs together (vLLM: its scheduler; Hugging Face: length-sorted
   batches) and yields each job's samples as it finishes; the run appends that record at
   once. A prompt too long for the context, one the chat template refuses, or one the
   engine refuses is a failed record. Once all are done each file is rewritten in input
   order.
3. With an answer cache (``run_cache``), the keys of all pending jobs are looked up once,
   before the engine loads; jobs the cache answers are written from it as the jobs are
   made, only the others reach the engine (none: the engine is not loaded at all), and each
   new answer is kept as its record is written.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from datagen.common.cli import progress
from datagen.common.errors import UserError, first_line
from datagen.common.jsonl import AppendJsonl
from datagen.common.params import GenParams
from datagen.finetuned import records
from datagen.finetuned.engine import BASE, Engine, Job, RequestRejected, Sample, request_seed
from datagen.finetuned.inputs import Request
from datagen.finetuned.records import exclusive, restore_input_order
from datagen.finetuned.run_cache import RunCache

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
    if limit is None or len(input_ids) + params.max_tokens <= limit:
        return None
    return RequestRejected("context_length_exceeded",
                           f"this model's maximum context length is {limit} tokens, but the request has "
                           f"{len(input_ids)} prompt tokens + {params.max_tokens} max new tokens "
                           f"= {len(input_ids) + params.max_tokens}; shorten the prompt or lower "
                           "max_tokens (--max_new_tokens)")


# --- the run -----------------------------------------------------------------------


@dataclass
class RunStats:
    total: int = 0  # requests in this shard
    skipped: int = 0  # already in the output
    done: int = 0  # written in this run (generated, failed or from the cache)
    cached: int = 0  # written from the answer cache
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    failed: Counter = field(default_factory=Counter)  # failed records written, by error code
    targets: list = field(default_factory=list)  # the run's Targets: per output, generated/skipped/failed


def decoding_in_words(params: GenParams) -> str:
    """Effective parameters as every run logs them: "greedy, up to 256 new tokens, n 1"."""
    how = (f"sampling at temperature {params.temperature:g}, top_p {params.top_p:g}, seed {params.seed}"
           if params.do_sample else "greedy")
    stops = f", stop {list(params.stop)}" if params.stop else ""
    return f"{how}, up to {params.max_tokens} new tokens, n {params.n}{stops}"


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
    cached: int = 0  # records written from the answer cache
    failed: Counter = field(default_factory=Counter)

    @property
    def run(self) -> str:
        """The run's name, as its records carry it: the adapter's NAME, or "base"."""
        return self.adapter if self.adapter is not None else BASE


def run_generation(engine, requests, outputs, command_line: GenParams = GenParams(), *,
                   ids: list[str] | None = None, renderer: Renderer | None = None, use_chat_template: str = "auto",
                   reorder: bool = True, show_progress: bool = True, regenerate_mismatched: bool = False,
                   load_engine=None, cache=None) -> RunStats:
    """Generate every request not yet in each output, appending one record per request.

    ``engine`` is an engine, or (with ``load_engine``, a function that loads and returns
    one) a ``loading.Plan``: then the lock, the check of the records already there and
    "nothing to do" are all decided before the weights load. ``outputs`` is one path
    (answered by the engine's only adapter, or the base model) or a dict ``{adapter name or
    None: path}``: all of them are answered in one stream, each adapter's prompts rendered
    and tokenized with its own tokenizer and chat template when it has them.
    ``requests`` is a list, or a function that streams them anew on each call (then
    ``ids``, their ``custom_id``s in order as ``check_requests`` returns them, must be
    given); a one-shot iterator is read into a list. ``command_line``: the parameters
    given over each request's own (``Request.params_under``). Records already in an
    output are reused only when their fingerprint matches what this run would make;
    otherwise the run refuses before generating anything, or with ``regenerate_mismatched``
    moves exactly those records to ``OUTPUT.replaced`` and makes them again. The rest go to
    the engine as one lazy stream of jobs (``Engine.stream``); each record is appended as
    its job finishes. A request the engine rejects becomes a failed record. ``cache``: an
    ``AnswerCache`` (``datagen.cache``; None: none) read before generating and written as
    records are (see ``run_cache``).
    """
    requests, ids = _replayable(requests, ids)
    targets = _targets(engine, outputs, renderer, use_chat_template)
    stats = RunStats(total=len(ids) * len(targets), targets=targets)
    with contextlib.ExitStack() as stack:
        for target in targets:
            target.real = stack.enter_context(exclusive(target.output))
        for target in targets:
            _resume(target, requests, ids, command_line, regenerate_mismatched)
        stats.skipped = sum(t.skipped for t in targets)
        if stats.skipped == stats.total:
            return stats
        run = _Run(engine, command_line, stats, targets, RunCache(cache) if cache is not None else None)
        from_cache = run.look_up(requests()) if run.cache is not None else 0
        log.info("%d requests to answer%s%s", stats.total - stats.skipped,
                 f" ({len(ids)} prompts x {len(targets)} outputs)" if len(targets) > 1 else "",
                 f", {from_cache} of them from the answer cache" if from_cache else "")
        load = (lambda: _loaded(load_engine, targets)) if load_engine is not None else None
        if load is not None and from_cache < stats.total - stats.skipped:
            run.engine, load = load(), None
        _answer(run, requests(), stack, show_progress, load)
        if reorder:
            for target in targets:
                if target.generated or target.cached or sum(target.failed.values()):
                    restore_input_order(target.real, ids)
    return stats


def _replayable(requests, ids: list[str] | None):
    """``requests`` as a function that streams them anew on each call, and their ids."""
    if not callable(requests):
        listed = list(requests)
        requests = lambda: listed  # noqa: E731
    return requests, ids if ids is not None else [r.custom_id for r in requests()]


def _targets(engine, outputs, renderer: Renderer | None, use_chat_template: str) -> list[Target]:
    """One ``Target`` per output, each with its adapter's renderer (targets whose adapters
    share a tokenizer share one) and provenance."""
    if not isinstance(outputs, dict):
        named = [adapter for adapter in engine.adapters if adapter is not None]
        if len(named) > 1:
            raise ValueError("several adapters: give run_generation one output per adapter")
        outputs = {named[0] if named else None: outputs}
    renderers: dict[int, Renderer] = {}
    targets = []
    files = getattr(engine, "files", None)
    for adapter, path in outputs.items():
        tokenizer = engine.tokenizer_for(adapter)
        target_renderer = renderer or renderers.setdefault(
            id(tokenizer), Renderer(tokenizer, use_chat_template, engine.model_name))
        targets.append(Target(adapter, Path(path), target_renderer, provenance=engine.provenance(adapter)))
        log.info("run %s: %s -> %s", targets[-1].run, files.tokenizer_origin(adapter) if files else "its tokenizer",
                 path)
    return targets


def _resume(target: Target, requests, ids: list[str], command_line: GenParams, regenerate: bool) -> None:
    """Set ``target.done`` to the ids whose records this run reuses, and count them."""
    target.done = _check_resume(target, requests(), command_line, regenerate)
    target.skipped = sum(1 for custom_id in ids if custom_id in target.done)
    if target.skipped:
        log.info("resuming run %s: %d of %d requests already in %s, made as this run would make them; "
                 "%d to go", target.run, target.skipped, len(ids), target.output, len(ids) - target.skipped)


def _answer(run: "_Run", requests: Iterable[Request], stack: contextlib.ExitStack, show_progress: bool,
            load=None) -> None:
    """Stream every pending job through the engine, appending each record as it finishes.
    ``load``: the cache answers every job, so the engine loads only if one still reaches it
    (an entry cleared meanwhile)."""
    stats, targets = run.stats, run.targets
    run.started = time.monotonic()  # the speed counts from here, not from the lookup or the loading
    run.bar = progress(total=stats.total - stats.skipped, desc="generating", unit="req",
                       **({} if show_progress else {"disable": True}))
    try:
        for target in targets:
            target.sink = stack.enter_context(AppendJsonl(target.real, sync_interval=SYNC_SECONDS))
        jobs = run.jobs(requests)
        if load is not None:
            first = next(jobs, None)  # writes the cached records
            if first is None:
                return
            run.engine, jobs = load(), itertools.chain([first], jobs)
        for job, result in run.engine.stream(jobs):
            run.finished(job, result)
    finally:
        run.bar.close()
        stats.seconds = time.monotonic() - run.started
        for target in targets:
            if target.sink is not None:
                target.sink.close()


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


def _check_resume(target: Target, requests, command_line: GenParams, regenerate: bool) -> set[str]:
    """The ids whose records in ``target``'s output this run reuses (see ``run_generation``)."""
    check = records.ResumeCheck(target.real, shown=target.output, run=target.run)
    if not check.records:
        return set()
    checked = 0
    pending: list[Request] = []

    def verify(batch: list[Request]) -> None:
        for request, input_ids in zip(batch, target.renderer.encode_many(batch)):
            params = request.params_under(command_line)
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

    def __init__(self, engine: Engine, command_line: GenParams, stats: RunStats, targets: list[Target],
                 cache: RunCache | None = None):
        self.engine, self.command_line, self.stats, self.targets = engine, command_line, stats, targets
        self.cache = cache
        self.warned: set = set()  # parameters already described or warned about
        self.started = time.monotonic()
        self.bar = None

    def jobs(self, requests: Iterable[Request]) -> Iterator[Job]:
        """Every pending (request, target) pair as a ``Job``, tokenized ``ENCODE_CHUNK``
        requests at a time as the engine takes them; within a chunk, in input order, one
        target after another."""
        for chunk in self._chunks(requests, self.targets):
            yield from self._jobs_of(chunk)

    def look_up(self, requests: Iterable[Request]) -> int:
        """Look the keys of every pending job up in the answer cache, once; the jobs it answers."""
        targets = self.cache.readable(self.targets)
        if not targets:
            return 0

        def keyed():
            for chunk in self._chunks(requests, targets):
                params_of, encoded = self._encode(chunk, targets)
                for target in targets:
                    for request, params, ids in zip(chunk, params_of, encoded[id(target.renderer)]):
                        if request.custom_id not in target.done and isinstance(ids, list):
                            yield target, self.cache.key(target.provenance, params, ids,
                                                         request_seed(params.seed, request.custom_id))

        return sum(self.cache.look_up(targets, keyed()).values())

    @staticmethod
    def _chunks(requests: Iterable[Request], targets: list[Target]) -> Iterator[list[Request]]:
        """The requests some target still has to answer, ``ENCODE_CHUNK`` at a time."""
        chunk: list[Request] = []
        for request in requests:
            if any(request.custom_id not in target.done for target in targets):
                chunk.append(request)
                if len(chunk) >= ENCODE_CHUNK:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def _encode(self, chunk: list[Request], targets: list[Target]) -> tuple[list[GenParams], dict[int, list]]:
        """Each request's effective parameters, and its token ids per renderer (targets
        without a tokenizer of their own share the base's: tokenized once)."""
        encoded: dict[int, list] = {}
        for target in targets:
            if id(target.renderer) not in encoded:
                encoded[id(target.renderer)] = target.renderer.encode_many(chunk)
        return [request.params_under(self.command_line) for request in chunk], encoded

    def _jobs_of(self, chunk: list[Request]) -> Iterator[Job]:
        """A chunk's jobs; a prompt the chat template refuses or too long for the context is
        written as a failed record here instead, and one the cache answers is written from it."""
        params_of, encoded = self._encode(chunk, self.targets)
        self._log_new_params(chunk, params_of)
        context_length = getattr(self.engine, "context_length", None)  # not loaded: the cache answers all
        # One target's jobs after another: vLLM then runs mostly one adapter a step. Jobs
        # interleaved per request (every step mixing two adapters and the base) ran at 0.58x
        # the speed of three plain runs on vLLM's CPU build; grouped, 1.0-1.8x (bench/README.md).
        for target in self.targets:
            for pos, (request, params) in enumerate(zip(chunk, params_of)):
                if request.custom_id in target.done:
                    continue
                seed = request_seed(params.seed, request.custom_id)
                ids = encoded[id(target.renderer)][pos]
                rejected = ids if isinstance(ids, RequestRejected) else too_long(ids, params, context_length)
                key = None if rejected or self.cache is None else self.cache.key(target.provenance, params, ids, seed)
                if key is not None and self._write_cached(request, target, params, ids, key):
                    continue
                if rejected is None:
                    yield Job((request, target, key), ids, params, target.adapter, seed)
                else:
                    self._write_failed(request, target, params, ids if isinstance(ids, list) else None, rejected)

    def _log_new_params(self, chunk: list[Request], params_of: list[GenParams]) -> None:
        """Log each new set of parameters once, with what it means."""
        for params in dict.fromkeys(params_of):
            if params in self.warned:
                continue
            self.warned.add(params)
            defaulted = len({request.custom_id for request, p in zip(chunk, params_of) if p == params
                             and self.command_line.temperature is None and request.asked.temperature is None})
            log.info("decoding: %s%s", decoding_in_words(params),
                     f" ({defaulted} requests set no temperature: the OpenAI API's default of 1 applies; "
                     "--temperature 0 for greedy)" if defaulted and params.do_sample else "")
            if params.n > 1 and not params.do_sample:
                log.warning("requests ask for n=%d with greedy decoding: their samples are identical; add "
                            "--do_sample or a temperature above 0 for different samples", params.n)
            warning = getattr(self.engine, "warning_for", lambda params: None)(params)
            if warning:
                log.warning("%s", warning)

    def finished(self, job: Job, result: list[Sample] | RequestRejected) -> None:
        """Append the record of a job the engine has answered (or refused)."""
        request, target, key = job.item
        if isinstance(result, RequestRejected):
            self._write_failed(request, target, job.params, job.input_ids, result)
            return
        record = records.make_record(
            request.custom_id, result, len(job.input_ids), target.provenance, job.params.record(),
            records.input_digest(job.input_ids), int(time.time()), request.ignored, request.request_sha256)
        target.sink.write(record)
        if key is not None:
            self.cache.keep(target, key, record)
        target.generated += 1
        stats = self.stats
        stats.completion_tokens += sum(sample.completion_tokens for sample in result)
        stats.prompt_tokens += len(job.input_ids)
        self._advance()

    def _write_cached(self, request: Request, target: Target, params: GenParams, input_ids: list[int],
                      key: str) -> bool:
        """Write the record of a job from the answer cache; False when the cache has no answer."""
        value = self.cache.answer(target, key)
        if value is None:
            return False
        target.sink.write(records.cached_record(
            value, request.custom_id, target.provenance, params.record(), records.input_digest(input_ids),
            int(time.time()), request.ignored, request.request_sha256))
        target.cached += 1
        self.stats.cached += 1
        self._advance()
        return True

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
