"""The queue behind ``batch_utils.py --run --wait``: any number of part files through a
model's enqueued-token limit, resumable from the manifest (``datagen.batchapi.batch_state``).

- Every part is checked locally first (``submit.open_run``); its tokens are estimated
  with ``estimates.estimate_tokens`` (input characters / 4 rounded up, plus the output
  cap), the same estimate the local stand-in enforces.
- Parts are submitted (``submit.submit_part``) while they fit: with
  ``--max_enqueued_tokens N`` a part waits until the model's running parts leave room for
  it (nothing is refused). Without it the limit is found out: parts go one at a time,
  each once the previous one passed validation, until one fails with
  ``token_limit_exceeded``; that part goes back to the queue, and the limit the refusal
  states ("Limit: N enqueued tokens") paces the rest. After a refusal, parts of that
  model are submitted only as its batches end, ``RESUBMIT_PER_FINISH`` per ended batch
  (or any when none of it runs), so the API is not hammered. A part refused while none
  of this run's batches of its model ran can never fit: it is reported as failed.
- The manifest is written atomically after every change; a rerun of the same command
  continues from it (``submit.open_run``), so no part is submitted twice.
- When every part has ended, the outputs are merged into OUTPUT and OUTPUT.errors.jsonl
  (``download.download``), the tokens used and their cost are printed; a rerun after
  that downloads nothing again.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

from datagen.batchapi import batch_cache, download, provenance, submit
from datagen.batchapi.batch_state import ENDED, Manifest, Part, save_state
from datagen.batchapi.estimates import report_usage, usage_of
from datagen.batchapi.openai_client import FINAL, Session, request_counts, validation_errors, wait_exit_status
from datagen.common import cli

log = logging.getLogger("datagen")

RESUBMIT_PER_FINISH = 2  # refused parts resubmitted per ended batch of the same model
LIMIT_CODE = "token_limit_exceeded"
LIMIT_IN_MESSAGE = re.compile(r"Limit: ([\d,]+) enqueued tokens")  # the API's token_limit_exceeded message


# --- the queue ---------------------------------------------------------------------


class Queue:
    """Submits parts as they fit and follows them to the end; see the module docstring."""

    def __init__(self, session: Session, manifest: Manifest, max_enqueued: int | None, description: str | None,
                 pending: dict[str, str], cache=None):
        self.session, self.manifest, self.max_enqueued = session, manifest, max_enqueued
        self.description, self.pending, self.cache = description, pending, cache
        self.credits: Counter = Counter()  # resubmissions allowed per model
        self.throttled: set[str] = {p.model for p in manifest.parts if p.refused}  # models that refused a part
        self.final: dict[str, object] = {}  # batch id -> its final batch object
        self.status: dict[str, str] = {}  # batch id -> the status seen last, to log changes

    @property
    def parts(self) -> list[Part]:
        return self.manifest.parts

    def save(self) -> None:
        """The manifest, then the ids file (the current batch of every submitted part)."""
        save_state(self.manifest, self.session.ids_file, self.pending)

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
        alone = not self.running(part.model)
        submit.submit_part(self.session, self.manifest, part, self.description, self.pending, alone, self.cache)

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
            if batch.status not in FINAL:
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


def run_queue(session: Session, args, protected, cache=None) -> int:
    """``--run --wait [--download OUTPUT]`` on a batch input of any number of parts; the
    answer cache answers what it can (``datagen.batchapi.batch_cache``)."""
    run = submit.open_run(session, args, cache)
    manifest = run.manifest
    if args.download:  # before anything is submitted: a new batch's results never replace another's
        provenance.refuse_other_results(Path(args.download), [i for p in manifest.parts for i in p.batches],
                                        f"the batches of {args.file}")
    if run.continuing and already_downloaded(manifest, args.download):
        print(f"every part of {args.file} has ended and its results are in {args.download}; nothing to do "
              f"(delete {manifest.path} to start over)")
        return 0
    continuing = sum(1 for p in manifest.parts if p.batches)
    if continuing:
        print(f"continuing the queue in {manifest.path}: {continuing} of {len(manifest.parts)} part(s) submitted "
              "before")
    queue = Queue(session, manifest, args.max_enqueued_tokens, args.description, run.pending, cache)
    queue.save()
    queue.run(args.poll_interval)
    finals = report_finals(session, queue)
    status = wait_exit_status(finals)
    report_usage([p.usage for p in manifest.parts], args.input_price, args.output_price)
    if args.download and not (finals and all(b.status == "failed" for b in finals)):
        answers = batch_cache.RunAnswers(manifest, cache)
        status = status or download.download(session, [b.id for b in finals], args.download, finals, protected,
                                             answers)
        manifest.downloaded = str(args.download)
        manifest.save()
    return status


def already_downloaded(manifest: Manifest, output: str | None) -> bool:
    """Every part ended and its merged results are where this run would put them."""
    return all(p.state in ENDED for p in manifest.parts) and bool(manifest.downloaded) and bool(output) \
        and Path(manifest.downloaded) == Path(output) and Path(output).exists()


def report_finals(session: Session, queue: Queue) -> list:
    """Print the queue and each part's last batch; returns those batches."""
    manifest = queue.manifest
    print_queue(manifest)
    print(submit.saved_message(manifest, session.ids_file))
    finals = [queue.final.get(p.batch_id) or session.retrieve(p.batch_id) for p in manifest.parts if p.batch_id]
    for batch in finals:
        total, completed, failed = request_counts(batch)
        print(f"{batch.id}: {batch.status} ({completed:,} completed, {failed:,} failed of {total:,})")
        if batch.status == "failed":
            print(f"  input refused: {validation_errors(batch)}")
    return finals


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
