"""The queue behind ``batch_utils.py --run --wait``: any number of part files through a
model's enqueued-token limit, resumable from a manifest.

- Every part is checked locally first; its tokens are estimated with
  ``batchfile.estimate_tokens`` (input characters / 4 rounded up, plus the output cap),
  the same estimate the local stand-in enforces.
- Parts are submitted while they fit: with ``--max_enqueued_tokens N`` a part waits until
  the model's running parts leave room for it (nothing is refused). Without it the limit
  is found out: parts go one at a time, each once the previous one passed validation,
  until one fails with ``token_limit_exceeded``; that part goes back to the queue, and the
  limit the refusal states ("Limit: N enqueued tokens") paces the rest. After a refusal,
  parts of that model are submitted only as its batches end, ``RESUBMIT_PER_FINISH`` per
  ended batch (or any when none of it runs), so the API is not hammered. A part refused
  while none of this run's batches of its model ran can never fit: it is reported as
  failed.
- The manifest (``last_batch_id.manifest.json`` beside the ids file, written atomically
  after every change) holds per part its file, sha256, uploaded file id, every batch id
  (refused ones included), state, counts and usage. A rerun of the same command
  continues from it; batches of a part that the manifest does not know (a kill between
  creating a batch and saving) are found by the sha256 in their metadata and adopted, so
  no part is submitted twice while a batch of it runs or has completed. A torn manifest
  is rebuilt the same way. The ids file keeps the current batch of every submitted part.
- When every part has ended, the outputs are merged into OUTPUT and OUTPUT.errors.jsonl
  (``openai_batch.download``), the tokens used and their cost are printed; a rerun
  after that downloads nothing again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from datagen import batchfile, cli, provenance
from datagen.errors import UserError
from datagen.jsonl import atomic_writer
from datagen.openai_client import (Session, check_state_path, read_ids_file, request_counts, save_batch_ids,
                                   sha256_of, validation_errors)

log = logging.getLogger("datagen")

MANIFEST_VERSION = 1
RESUBMIT_PER_FINISH = 2  # refused parts resubmitted per ended batch of the same model
ENDED = ("done", "failed")  # part states that are final
LIMIT_CODE = "token_limit_exceeded"
LIMIT_IN_MESSAGE = re.compile(r"Limit: ([\d,]+) enqueued tokens")  # the API's token_limit_exceeded message


def manifest_path(ids_file: str | os.PathLike) -> Path:
    """``last_batch_id.tok`` -> ``last_batch_id.manifest.json`` (beside it)."""
    ids_file = Path(ids_file)
    return ids_file.with_name(ids_file.stem + ".manifest.json")


@dataclass
class Part:
    """One part file in the queue. ``state``: waiting (never submitted), refused (back in
    the queue after ``token_limit_exceeded``), running, done (completed, expired or
    cancelled: see ``outcome``), failed (its input was refused)."""

    file: str
    sha256: str
    requests: int
    input_tokens: int
    output_tokens: int
    model: str
    url: str
    file_id: str | None = None
    batches: list[str] = field(default_factory=list)  # every batch made for it, oldest first
    refused: list[str] = field(default_factory=list)  # those that failed with token_limit_exceeded
    state: str = "waiting"
    outcome: str | None = None  # the final status of its last batch
    alone: bool = False  # no other part of its model ran when its last batch was created
    counts: dict = field(default_factory=dict)  # total, completed, failed of its last batch
    usage: dict = field(default_factory=dict)  # input, cached, output, reasoning, total tokens

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def batch_id(self) -> str | None:
        return self.batches[-1] if self.batches else None

    def done_requests(self) -> int:
        if self.state in ENDED:
            return self.requests
        return (self.counts.get("completed") or 0) + (self.counts.get("failed") or 0)


@dataclass
class Manifest:
    path: Path
    input: str
    parts: list[Part]
    retry_of: list[str] = field(default_factory=list)  # the batches a --retry_failed file retries
    downloaded: str | None = None  # where the merged results were saved
    limits: dict[str, int] = field(default_factory=dict)  # model -> the enqueued-token limit a refusal stated

    def save(self) -> None:
        """Replace the manifest atomically: a crash leaves the old one or the new one, whole."""
        data = {"version": MANIFEST_VERSION, "input": self.input, "retry_of": self.retry_of,
                "downloaded": self.downloaded, "limits": self.limits, "parts": [asdict(part) for part in self.parts]}
        with atomic_writer(self.path) as handle:
            handle.write(json.dumps(data, indent=1) + "\n")


def load_manifest(path: Path) -> tuple[Manifest | None, bool]:
    """The manifest at ``path`` (None when absent) and whether it was torn or unreadable."""
    if not os.path.lexists(path):
        return None, False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        parts = [Part(**part) for part in data["parts"]]
        manifest = Manifest(path, data["input"], parts, list(data.get("retry_of") or []), data.get("downloaded"),
                            {str(k): int(v) for k, v in (data.get("limits") or {}).items()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is torn or unreadable (%s); rebuilding it from the batches at the API", path,
                    type(exc).__name__)
        return None, True
    return manifest, False


def read_queue(ids_file: str | os.PathLike) -> Manifest | None:
    manifest, _ = load_manifest(manifest_path(ids_file))
    return manifest


# --- cost --------------------------------------------------------------------------


def estimated_cost(parts: list[Part], input_price: float, output_price: float) -> float:
    return (sum(p.input_tokens for p in parts) * input_price + sum(p.output_tokens for p in parts) * output_price) / 1e6


def check_cost(parts: list[Part], max_cost: float | None, input_price: float | None,
               output_price: float | None) -> None:
    """Refuse a run whose whole input is estimated over ``max_cost`` (USD)."""
    if max_cost is None:
        return
    if input_price is None or output_price is None:
        raise UserError("--max_cost needs --input_price and --output_price (USD per 1M tokens) to estimate the cost")
    if not all(p.output_tokens for p in parts):
        raise UserError("--max_cost: some requests set no output cap, so their cost has no bound; make the batch "
                        "input with create_batchinput.py --max_tokens N")
    cost = estimated_cost(parts, input_price, output_price)
    if not (math.isfinite(cost) and math.isfinite(max_cost)):  # nan > cap is False: never let it through
        raise UserError(f"--max_cost: the cost estimate is {cost} against a cap of {max_cost}; give finite prices "
                        "and cap")
    if cost > max_cost:
        inputs, outputs = sum(p.input_tokens for p in parts), sum(p.output_tokens for p in parts)
        raise UserError(f"the whole input is estimated at up to {batchfile.usd(cost)} ({inputs:,} input + at most "
                        f"{outputs:,} output tokens), over --max_cost {batchfile.usd(max_cost)}; nothing was "
                        "submitted: raise --max_cost or submit fewer requests")


def usage_of(batch) -> dict:
    """The token counts of a batch's ``usage`` (zeros when the service sends none)."""
    usage = batch.usage
    if usage is None:
        return {}
    cached = getattr(getattr(usage, "input_tokens_details", None), "cached_tokens", 0) or 0
    reasoning = getattr(getattr(usage, "output_tokens_details", None), "reasoning_tokens", 0) or 0
    return {"input_tokens": usage.input_tokens or 0, "cached_tokens": cached, "output_tokens": usage.output_tokens or 0,
            "reasoning_tokens": reasoning, "total_tokens": usage.total_tokens or 0}


def report_usage(usages: list[dict], input_price: float | None, output_price: float | None) -> None:
    """Print the tokens the batches used (the sum of their ``usage``) and, given prices, the cost."""
    total = Counter()
    for usage in usages:
        total.update(usage)
    print(f"tokens used: {total['input_tokens']:,} input ({total['cached_tokens']:,} cached) + "
          f"{total['output_tokens']:,} output ({total['reasoning_tokens']:,} reasoning) = "
          f"{total['total_tokens']:,} tokens")
    if input_price is not None or output_price is not None:
        cost = (total["input_tokens"] * (input_price or 0) + total["output_tokens"] * (output_price or 0)) / 1e6
        print(f"cost: {batchfile.usd(cost)} at the prices given (input {input_price or 0} and output "
              f"{output_price or 0} USD per 1M tokens; cached input counted at the input price)")


# --- the queue ---------------------------------------------------------------------


class Queue:
    """Submits parts as they fit and follows them to the end; see the module docstring."""

    def __init__(self, session: Session, manifest: Manifest, max_enqueued: int | None, description: str | None,
                 pending: dict[str, str]):
        self.session, self.manifest, self.max_enqueued = session, manifest, max_enqueued
        self.description, self.pending = description, pending
        self.credits: Counter = Counter()  # resubmissions allowed per model
        self.throttled: set[str] = {p.model for p in manifest.parts if p.refused}  # models that refused a part
        self.final: dict[str, object] = {}  # batch id -> its final batch object
        self.status: dict[str, str] = {}  # batch id -> the status seen last, to log changes

    @property
    def parts(self) -> list[Part]:
        return self.manifest.parts

    def save(self) -> None:
        """The manifest, then the ids file (the current batch of every submitted part)."""
        self.manifest.save()
        ids = [p.batch_id for p in self.parts if p.batch_id and p.batch_id not in p.refused]
        save_batch_ids(self.session.ids_file, self.manifest.retry_of + ids, self.pending)

    def running(self, model: str) -> list[Part]:
        return [p for p in self.parts if p.state == "running" and p.model == model]

    def may_submit(self, part: Part) -> bool:
        running = self.running(part.model)
        known = [n for n in (self.max_enqueued, self.manifest.limits.get(part.model)) if n is not None]
        limit = min(known) if known else None  # a limit a refusal stated beats a --max_enqueued_tokens too high
        if limit is not None and running and sum(p.tokens for p in running) + part.tokens > limit:
            return False
        if limit is None and any(self.status.get(p.batch_id, "validating") == "validating" for p in running):
            return False  # the limit is unknown: add one part at a time, each once the last one was admitted
        if part.model in self.throttled and running:
            if self.credits[part.model] <= 0:
                return False
            self.credits[part.model] -= 1
        return True

    def submit_ready(self) -> None:
        for part in self.parts:
            if part.state in ("waiting", "refused") and self.may_submit(part):
                self.submit(part)

    def submit(self, part: Part) -> None:
        session, client = self.session, self.session.client
        path = Path(part.file)
        if part.file_id is None:  # a refused part reuses its upload
            with open(path, "rb") as handle:
                uploaded = session.call(f"uploading {path}", client.files.create, file=(path.name, handle),
                                        purpose="batch")
            part.file_id = session.expect(f"uploading {path}", uploaded, "file").id
            self.manifest.save()
        metadata = {"source_file": path.name[:512], "source_sha256": part.sha256}
        if self.description:
            metadata["description"] = self.description
        if self.manifest.retry_of:  # a marker (cut at 512) for --retry_failed: read this batch's successes too
            metadata["retry_of"] = ",".join(self.manifest.retry_of)[:512]
        alone = not self.running(part.model)
        with cli.held_signals():  # Ctrl+C waits until the new id is saved
            batch = session.call(f"creating the batch for {path}", client.batches.create, input_file_id=part.file_id,
                                 endpoint=part.url, completion_window="24h", metadata=metadata)
            session.expect(f"creating the batch for {path}", batch, "batch")
            part.batches.append(batch.id)
            part.state, part.alone, part.counts = "running", alone, {}
            self.save()
        provenance.record_batch(session.ids_file, batch.id, path.name, part.sha256, part.model, self.manifest.retry_of)
        again = f", again after {len(part.refused)} refusal(s)" if part.refused else ""
        print(f"submitted {batch.id} for {path} ({part.requests:,} requests, {part.url}, {part.model}, about "
              f"{part.tokens:,} tokens{again})", flush=True)

    def poll(self) -> None:
        """Retrieve every running part's batch and move the part on when the batch ended;
        the manifest is saved when anything changed."""
        changed = False
        for part in self.parts:
            if part.state != "running":
                continue
            batch = self.session.retrieve(part.batch_id)
            total, completed, failed = request_counts(batch)
            old = self.status.get(batch.id)
            if old is not None and old != batch.status:
                log.info("%s: %s -> %s (%s/%s done, %s failed)", batch.id, old, batch.status,
                         f"{completed + failed:,}", f"{total:,}", f"{failed:,}")
            self.status[batch.id] = batch.status
            counts = {"total": total, "completed": completed, "failed": failed}
            changed = changed or counts != part.counts
            part.counts = counts
            if batch.status not in ("completed", "failed", "expired", "cancelled"):
                continue
            changed = True
            self.final[batch.id] = batch
            codes = [e.code for e in (batch.errors.data if batch.errors and batch.errors.data else [])]
            if batch.status == "failed" and LIMIT_CODE in codes:
                self.refused(part, batch)
                continue
            part.state = "failed" if batch.status == "failed" else "done"
            part.outcome, part.usage = batch.status, usage_of(batch)
            self.save()  # before saying so: a kill after the message finds the part ended
            if batch.status == "failed":
                log.warning("%s: batch %s failed: its input was refused (%s)", part.file, batch.id,
                            validation_errors(batch))
            else:
                if part.model in self.throttled:
                    self.credits[part.model] += RESUBMIT_PER_FINISH
                log.info("%s: batch %s %s (%s completed, %s failed of %s)", part.file, batch.id, batch.status,
                         f"{completed:,}", f"{failed:,}", f"{total:,}")
        if changed:
            self.save()

    def refused(self, part: Part, batch) -> None:
        part.refused.append(batch.id)
        self.throttled.add(part.model)
        stated = [LIMIT_IN_MESSAGE.search(e.message or "") for e in batch.errors.data]
        if any(stated):  # pace by it from now on (our estimate may differ from the API's: credits still apply)
            self.manifest.limits[part.model] = int(next(m for m in stated if m).group(1).replace(",", ""))
        if part.alone:
            part.state, part.outcome = "failed", "failed"
        else:
            part.state = "refused"
        self.save()
        if part.alone:  # nothing of ours held the limit: it cannot fit by waiting for our batches
            log.warning("%s: batch %s refused (%s) while none of this run's %s batches ran: the part is over the "
                        "enqueued-token limit alone (or other batches of the organization fill it); split the input "
                        "with create_batchinput.py --max_tokens_per_file, or rerun later", part.file, batch.id,
                        LIMIT_CODE, part.model)
        else:
            log.warning("%s: batch %s refused (%s); back in the queue until a batch of %s ends", part.file,
                        batch.id, validation_errors(batch, 1), part.model)

    def run(self, poll_interval: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Submit and poll until every part has ended; Ctrl+C leaves the batches running."""
        cli.set_interrupt_hint("the running batches go on at the API: rerun the same command to continue the queue "
                               "(--check shows it, --cancel cancels the running batches)")
        bar = cli.progress(total=sum(p.requests for p in self.parts), desc="requests", unit="req")
        try:
            while True:
                self.poll()
                self.submit_ready()
                done = sum(p.done_requests() for p in self.parts)
                if done > bar.n:
                    bar.update(done - bar.n)
                if all(p.state in ENDED for p in self.parts):
                    break
                sleep(poll_interval)
        finally:  # on Ctrl+C or SIGTERM too: cli.run prints the hint; the manifest is saved already
            bar.close()


def adopt(session: Session, parts: list[Part], saved_ids: list[str], listed: list | None) -> None:
    """Give every part without a live batch the newest live or completed batch of its
    content that the API has (found by ``source_sha256``): one created before a kill
    could save it, or one of a torn manifest."""
    from datagen.openai_batch import BLOCKING

    known = {batch_id for part in parts for batch_id in part.batches}
    candidates = [b for b in (session.retrieve(i, missing_ok=True) for i in saved_ids if i not in known) if b]
    candidates += [b for b in (listed or []) if b.id not in known]
    by_digest = {p.sha256: p for p in parts if p.state in ("waiting", "refused")}
    for batch in sorted(candidates, key=lambda b: b.created_at or 0):
        metadata = batch.metadata if isinstance(batch.metadata, dict) else {}
        part = by_digest.get(metadata.get("source_sha256"))
        if part is not None and batch.status in BLOCKING and batch.id not in part.batches:
            part.batches.append(batch.id)
            part.state, part.counts = "running", {}
            log.info("%s: found its batch %s (%s) at the API; following it instead of submitting again", part.file,
                     batch.id, batch.status)


def plan_parts(input_path: str, known: Manifest | None = None) -> list[Part]:
    """Check every part file locally and describe it for the queue; a file whose sha256
    is in the ``known`` manifest was checked by an earlier run and is not read again."""
    checked = {p.sha256: p for p in known.parts} if known else {}
    parts = []
    for path in batchfile.resolve_batch_files(input_path):
        digest = sha256_of(path)
        if digest in checked:
            old = checked[digest]
            parts.append(Part(str(path), digest, old.requests, old.input_tokens, old.output_tokens, old.model, old.url))
            continue
        summary = batchfile.check_batch_file(path)
        parts.append(Part(str(path), digest, summary.requests, summary.input_tokens, summary.output_tokens,
                          summary.model, summary.url))
    return parts


def run_queue(session: Session, args, protected) -> int:
    """``--run --wait [--download OUTPUT]`` on a batch input of any number of parts."""
    from datagen import openai_batch

    if args.description is not None and len(args.description) > 512:
        raise UserError(f"--description is {len(args.description)} characters; batch metadata values hold at most "
                        "512")
    ids_file = check_state_path(session.ids_file)
    path = check_state_path(manifest_path(ids_file), "--ids_file")
    old, torn = load_manifest(path)
    parts = plan_parts(args.file, old)
    check_cost(parts, args.max_cost, args.input_price, args.output_price)
    if args.max_enqueued_tokens is not None:
        for part in parts:
            if part.tokens > args.max_enqueued_tokens:
                raise UserError(f"{part.file}: about {part.tokens:,} tokens, over --max_enqueued_tokens "
                                f"{args.max_enqueued_tokens:,} on its own; split the input with create_batchinput.py "
                                f"--max_tokens_per_file {args.max_enqueued_tokens}")
    saved = read_ids_file(ids_file)
    digests = {Path(p.file): p.sha256 for p in parts}
    same_input = old is not None and sorted(p.sha256 for p in old.parts) == sorted(digests.values())
    if same_input:
        manifest = old
        manifest.input = str(args.file)
        for part, new in zip(sorted(manifest.parts, key=lambda p: p.sha256), sorted(parts, key=lambda p: p.sha256)):
            part.file = new.file  # the same content may sit under a new name
    else:
        retry_of = saved.ids if any(d in saved.pending for d in digests.values()) else []
        manifest = Manifest(path, str(args.file), parts, retry_of)
    pending = {d: n for d, n in saved.pending.items() if d not in digests.values()} if manifest.retry_of else {}
    if same_input or torn:
        listed = session.list_batches(openai_batch.RECENT, "looking for this input's batches", True)
        adopt(session, manifest.parts, saved.ids, listed)
    elif not args.force:
        openai_batch.refuse_resubmission(session, digests, saved.ids)
    if args.download:  # before anything is submitted: a new batch's results never replace another's
        provenance.refuse_other_results(Path(args.download), [i for p in manifest.parts for i in p.batches],
                                        f"the batches of {args.file}")
    if same_input and all(p.state in ENDED for p in manifest.parts) and manifest.downloaded and args.download \
            and Path(manifest.downloaded) == Path(args.download) and Path(args.download).exists():
        print(f"every part of {args.file} has ended and its results are in {args.download}; nothing to do "
              f"(delete {path} to start over)")
        return 0
    continuing = sum(1 for p in manifest.parts if p.batches)
    if continuing:
        print(f"continuing the queue in {path}: {continuing} of {len(manifest.parts)} part(s) submitted before")
    queue = Queue(session, manifest, args.max_enqueued_tokens, args.description, pending)
    queue.save()
    queue.run(args.poll_interval)
    print_queue(manifest)
    after = f", after the {len(manifest.retry_of)} batch(es) they retry" if manifest.retry_of else ""
    print(f"saved {len(manifest.parts)} batch id(s) in {ids_file}{after}")
    finals = [queue.final.get(p.batch_id) or session.retrieve(p.batch_id) for p in manifest.parts]
    for batch in finals:
        total, completed, failed = request_counts(batch)
        print(f"{batch.id}: {batch.status} ({completed:,} completed, {failed:,} failed of {total:,})")
        if batch.status == "failed":
            print(f"  input refused: {validation_errors(batch)}")
    status = openai_batch.wait_exit_status(finals)
    report_usage([p.usage for p in manifest.parts], args.input_price, args.output_price)
    if args.download:
        if all(b.status == "failed" for b in finals):
            return status
        ids = [b.id for b in finals]
        status = status or openai_batch.download(session, ids, args.download, finals, protected)
        manifest.downloaded = str(args.download)
        manifest.save()
    return status


def print_queue(manifest: Manifest, live: dict | None = None) -> None:
    """The queue: parts per state, requests, refusals and the enqueued-token estimate."""
    states = Counter(p.state for p in manifest.parts)
    order = ("waiting", "refused", "running", "done", "failed")
    done = sum(p.done_requests() for p in manifest.parts)
    total = sum(p.requests for p in manifest.parts)
    refusals = sum(len(p.refused) for p in manifest.parts)
    print(f"queue ({manifest.path}): " + ", ".join(f"{states[s]} {s}" for s in order if states[s])
          + f"; {done:,}/{total:,} requests done; {refusals} refused submission(s)")
    enqueued = defaultdict(int)
    for part in manifest.parts:
        if part.state == "running":
            enqueued[part.model] += part.tokens
    for model, tokens in enqueued.items():
        print(f"  enqueued: about {tokens:,} tokens of {model}")
    for part in manifest.parts:
        status = (live or {}).get(part.batch_id) or part.outcome or "-"
        counts = part.counts or {}
        print(f"  {part.file}: {part.state} ({status}), batch {part.batch_id or '-'}, "
              f"{(counts.get('completed') or 0) + (counts.get('failed') or 0):,}/{part.requests:,} requests, "
              f"about {part.tokens:,} tokens" + (f", refused {len(part.refused)}x" if part.refused else ""))
