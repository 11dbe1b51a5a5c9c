"""The fine-tuned route's run, the same for every engine: prompts to token ids, batches,
resume, failed records, progress, records.

1. ``Renderer`` turns requests into the exact token ids the model sees: conversations
   (and plain prompts, when the tokenizer has a template) through the chat template,
   rendered as text and tokenized without a second BOS. Both engines get these ids.
2. ``run_generation`` checks the records already in the output against what this run
   would make (``datagen.records`` fingerprints) and refuses, or regenerates exactly the
   mismatched ones; then reads the rest in windows of ``SORT_WINDOW`` requests, groups them
   by their effective parameters (``datagen.inputs``), sorts each group by prompt length
   into batches (by default ``batch_size`` rows of the longest prompts and as many
   shorter ones as fit the same token budget), and has the engine generate each batch.
   A prompt too long for the context, or one the chat template refuses, is a failed
   record; an out-of-memory error halves the batch. One record per request is appended
   as each batch finishes (flushed and fsynced); once all are done the file is rewritten
   in input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import records
from datagen.engine import Engine, GenParams, RequestRejected
from datagen.engine_hf import is_oom
from datagen.errors import UserError, first_line
from datagen.inputs import BASE, Overrides, Request, describe, effective_params
from datagen.jsonl import AppendJsonl
from datagen.records import exclusive, restore_input_order

log = logging.getLogger("datagen")

SORT_WINDOW = 8192  # requests read, sorted by length and generated together (bounds memory)
BUDGET_ROWS_FACTOR = 8  # with a token budget, a batch holds at most this many times --batch_size prompts
VERIFY_CHUNK = 1024  # resume: requests already done, tokenized this many at a time to check their input


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
    pad_tokens: int = 0
    seconds: float = 0.0
    batch_size: int = 0  # the batch size in the end (after any halving)
    max_batch_tokens: int | None = 0  # the token budget in the end (0: none; None: auto)
    batches: int = 0  # batches generated
    failed: Counter = field(default_factory=Counter)  # failed records written, by error code
    targets: list = field(default_factory=list)  # the run's Targets: per output, generated/skipped/failed


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_batches(requests: list, batch_size: int, max_new_tokens: int = 0,
                 max_batch_tokens: int | None = 0) -> list[list[Request]]:
    """Sort by prompt length (longest first, so an OOM shows early) and cut into batches
    (of requests, or of ``Item``s: anything with ``input_ids`` and ``index``).

    ``max_batch_tokens`` 0: batches of ``batch_size`` prompts. Otherwise a token budget
    (lm-eval-harness / vLLM style): a batch takes prompts while its rows times (its
    longest prompt + ``max_new_tokens``), the KV cache it holds at the end, stay within
    the budget, so short prompts go in bigger batches (at most ``BUDGET_ROWS_FACTOR`` x
    ``batch_size`` rows). ``None`` (auto): the budget is what ``batch_size`` rows of the
    window's longest prompt take, so no batch holds a larger KV cache than a plain
    batch of ``batch_size`` prompts would at its largest.
    """
    ordered = sorted(requests, key=lambda r: (-len(r.input_ids), r.index))
    if max_batch_tokens == 0 or not ordered:
        return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if max_batch_tokens is None:
        max_batch_tokens = batch_size * (len(ordered[0].input_ids) + max_new_tokens)
    max_rows = BUDGET_ROWS_FACTOR * batch_size
    batches: list[list] = []
    current: list = []
    for request in ordered:
        width = len(current[0].input_ids) if current else len(request.input_ids)  # longest first
        if current and (len(current) >= max_rows or (len(current) + 1) * (width + max_new_tokens) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(request)
    batches.append(current)
    return batches


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


class Item:
    """One request for one target, with its token ids as that target's tokenizer made them:
    what a batch holds."""

    __slots__ = ("request", "target", "input_ids")

    def __init__(self, request: Request, target: Target):
        self.request, self.target = request, target
        self.input_ids: list[int] | None = None

    @property
    def index(self) -> int:
        return self.request.index


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


def run_generation(engine, requests, outputs, overrides: Overrides, batch_size: int, *,
                   ids: list[str] | None = None, renderer: Renderer | None = None, use_chat_template: str = "auto",
                   reorder: bool = True, show_progress: bool = True, max_batch_tokens: int | None = 0,
                   regenerate_mismatched: bool = False, load_engine=None) -> RunStats:
    """Generate every request not yet in each output, appending one record per request.

    ``engine`` is an engine, or (with ``load_engine``, a function that loads and returns
    one) a ``BeforeLoading``: then the lock, the check of the records already there and
    "nothing to do" are all decided before the weights load. ``outputs`` is one path
    (answered by the engine's only adapter, or the base model) or a dict ``{adapter name or
    None: path}``: all of them are answered in the same batches, each adapter's prompts
    rendered and tokenized with its own tokenizer and chat template when it has them.
    ``requests`` is a list, or a function that streams them anew on each call (then
    ``ids``, their ``custom_id``s in order as ``check_requests`` returns them, must be
    given); a one-shot iterator is read into a list. Records already in an output are
    reused only when their fingerprint matches what this run would make; otherwise the
    run refuses before generating anything, or with ``regenerate_mismatched`` moves exactly
    those records to ``OUTPUT.replaced`` and makes them again. New requests are read
    ``SORT_WINDOW`` at a time, and each window is sorted by length into batches: of
    ``batch_size`` prompts, or by a token budget (``max_batch_tokens``; ``None``: auto,
    see ``plan_batches``). A request the engine rejects becomes a failed record.
    """
    from datagen.cli import progress

    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 0:
        raise UserError(f"--max_batch_tokens must be 0 (off), auto or a positive number, got {max_batch_tokens}")
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
        tokenizer = engine.tokenizer_for(adapter) if hasattr(engine, "tokenizer_for") else engine.tokenizer
        target_renderer = renderer or renderers.setdefault(
            id(tokenizer), Renderer(tokenizer, use_chat_template, engine.model_name))
        targets.append(Target(adapter, Path(path), target_renderer, provenance=engine.provenance(adapter)))
        files = getattr(engine, "files", None)
        log.info("run %s: %s -> %s", targets[-1].run, files.describe(adapter) if files else "its tokenizer", path)
    stats = RunStats(total=len(ids) * len(targets), batch_size=batch_size, max_batch_tokens=max_batch_tokens)
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
        log.info("%d requests to answer%s, in batches of up to %d of the longest prompts", todo,
                 f" ({len(ids)} prompts x {len(targets)} outputs)" if len(targets) > 1 else "", batch_size)
        run = _Run(engine, overrides, stats, targets)
        run.started = time.monotonic()
        run.bar = progress(total=todo, desc="generating", unit="req", **({} if show_progress else {"disable": True}))
        try:
            for target in targets:
                target.sink = stack.enter_context(AppendJsonl(target.real))
            window: list[Item] = []
            for request in requests():
                window.extend(Item(request, t) for t in targets if request.custom_id not in t.done)
                if len(window) >= SORT_WINDOW:
                    run.window(window)
                    window = []
            if window:
                run.window(window)
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
    """The state of one run while it generates: engine, renderer, targets, counters, progress."""

    def __init__(self, engine: Engine, overrides: Overrides, stats: RunStats, targets: list[Target]):
        self.engine, self.overrides, self.stats, self.targets = engine, overrides, stats, targets
        self.warned: set = set()  # parameters already described or warned about
        self.started = time.monotonic()
        self.bar = None

    def window(self, window: list[Item]) -> None:
        """Group a window's items by parameters (all equal in the usual case), then generate."""
        groups: dict[GenParams, list[Item]] = {}
        for item in window:
            groups.setdefault(effective_params(item.request, self.overrides), []).append(item)
        for params, group in groups.items():
            self._describe(params, group)
            # Each request tokenized once per tokenizer (targets without their own share the base's).
            by_renderer: dict[int, tuple[Renderer, list[Item]]] = {}
            for item in group:
                by_renderer.setdefault(id(item.target.renderer), (item.target.renderer, []))[1].append(item)
            accepted = []
            for renderer, items in by_renderer.values():
                requests = list({id(item.request): item.request for item in items}.values())
                encoded = {id(r): ids for r, ids in zip(requests, renderer.encode_many(requests))}
                for item in items:
                    ids = encoded[id(item.request)]
                    if isinstance(ids, list):
                        item.input_ids = ids
                        ids = too_long(ids, params, self.engine.context_length)
                    if ids is not None:
                        self._write_failed(item, params, ids)
                    else:
                        accepted.append(item)
            if accepted:
                self._run_group(accepted, params)

    def _describe(self, params: GenParams, group: list[Item]) -> None:
        if params in self.warned:
            return
        self.warned.add(params)
        defaulted = len({item.request.custom_id for item in group
                         if self.overrides.temperature is None and item.request.params.get("temperature") is None})
        log.info("decoding: %s%s", describe(params),
                 f" ({defaulted} requests set no temperature: the OpenAI API's default of 1 applies; "
                 "--temperature 0 for greedy)" if defaulted and params.do_sample else "")
        if params.num_return_sequences > 1 and not params.do_sample:
            log.warning("requests ask for n=%d with greedy decoding: their samples are identical; "
                        "add --do_sample or a temperature above 0 for different samples", params.num_return_sequences)
        warning = getattr(self.engine, "warning_for", lambda params: None)(params)
        if warning:
            log.warning("%s", warning)

    def _write_failed(self, item: Item, params: GenParams, rejected: RequestRejected) -> None:
        request, target = item.request, item.target
        target.sink.write(records.failed_record(
            request.custom_id, rejected.code, rejected.message,
            len(item.input_ids) if item.input_ids is not None else None, target.provenance, params.record(),
            _input_hash(request, item.input_ids), int(time.time())))
        target.failed[rejected.code] += 1
        self.stats.failed[rejected.code] += 1
        if sum(self.stats.failed.values()) <= 3:
            log.warning("%s: failed (%s): %s", request.where, rejected.code, rejected.message)
        self.stats.done += 1
        self.bar.update(1)

    def _run_group(self, group: list[Item], params: GenParams) -> None:
        stats = self.stats
        record_params = params.record()
        pending = plan_batches(group, stats.batch_size, params.max_new_tokens, stats.max_batch_tokens)
        while pending:
            batch = pending.pop(0)
            try:
                results = self.engine.generate([item.input_ids for item in batch], params,
                                               [item.target.adapter for item in batch],
                                               batch_seed(params.seed, [item.request.custom_id for item in batch]))
            except RequestRejected as exc:
                # The engine refused something in the batch: find the request(s) one by one.
                if len(batch) > 1:
                    pending = [[item] for item in batch] + pending
                else:
                    self._write_failed(batch[0], params, exc)
                continue
            except Exception as exc:
                if not is_oom(exc):
                    raise
                pending = self._halve(batch, pending, params)
                continue
            now = int(time.time())
            width = max(len(item.input_ids) for item in batch)
            lines: dict[int, list] = {}
            for item, samples in zip(batch, results):
                request = item.request
                lines.setdefault(id(item.target), []).append(records.make_record(
                    request.custom_id, samples, len(item.input_ids), item.target.provenance, record_params,
                    records.input_digest(item.input_ids), now, request.ignored))
                item.target.generated += 1
                stats.completion_tokens += sum(s.completion_tokens for s in samples)
                stats.prompt_tokens += len(item.input_ids)
                stats.pad_tokens += width - len(item.input_ids)
            for target in self.targets:
                if id(target) in lines:
                    target.sink.write_many(lines[id(target)])
            stats.done += len(batch)
            stats.batches += 1
            elapsed = max(time.monotonic() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{stats.completion_tokens / elapsed:,.0f} tok/s", refresh=False)
            self.bar.update(len(batch))

    def _halve(self, batch: list[Item], pending: list[list[Item]], params: GenParams) -> list[list[Item]]:
        """After an out-of-memory error: halve the batch size (and token budget), plan again."""
        stats = self.stats
        _free_memory()
        if len(batch) == 1:
            request = batch[0].request
            raise UserError(f"{request.where}: out of memory even at batch size 1 "
                            f"({len(batch[0].input_ids)} prompt tokens + {params.max_new_tokens} new); "
                            "lower --max_new_tokens, use --dtype bfloat16, or spread the model over "
                            "more GPUs with --device_map auto") from None
        # A token-budget batch can hold more than batch_size short prompts: halve what
        # failed, rows and budget alike.
        stats.batch_size = max(1, min(stats.batch_size, len(batch)) // 2)
        if stats.max_batch_tokens:
            failed = len(batch) * (max(len(item.input_ids) for item in batch) + params.max_new_tokens)
            stats.max_batch_tokens = max(1, min(stats.max_batch_tokens, failed) // 2)
        log.warning("out of memory at batch size %d; halving to %d", len(batch), stats.batch_size)
        rest = [item for b in [batch] + pending for item in b]
        return plan_batches(rest, stats.batch_size, params.max_new_tokens, stats.max_batch_tokens)


def batch_seed(seed: int, custom_ids: list[str]) -> int:
    """A seed for one batch, from the run's seed and the batch's ids: the same batch samples
    the same way in every run, and different batches draw different random numbers."""
    digest = hashlib.sha256(f"{seed}\n{chr(10).join(custom_ids)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
