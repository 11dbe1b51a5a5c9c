"""The OpenAI Batch API route: every batch action behind batch_utils.py, and the map of
the modules that do them.

- ``--run``: ``datagen.batchapi.submit`` (check every part locally, refuse a file already
  submitted unless ``--force``, upload, create one batch per part); with ``--wait`` the
  parts go through the queue (``datagen.batchapi.batch_queue``), paced under the
  enqueued-token limit, and a rerun continues from the manifest. Both keep their state in
  the manifest and the ids file (``datagen.batchapi.batch_state``).
- Here: ``check`` (``batch_summary``), ``wait`` (poll to a final state with a progress
  bar), ``cancel``, ``list_recent``.
- ``--download``: ``datagen.batchapi.download`` (output and error files of all batches
  into OUTPUT and OUTPUT.errors.jsonl, atomically, with the provenance sidecar of
  ``datagen.batchapi.provenance``); ``--retry_failed``: ``datagen.batchapi.retry``.
- The answer cache (``--run`` uploads only the lines never answered, ``--download`` adds
  the cached answers and keeps the new ones): ``datagen.batchapi.batch_cache``.
- The key, the client and reading the API's objects: ``datagen.batchapi.openai_client``.
- ``add_batch_args(parser)`` defines the flags; ``run_command(args, parser)`` runs them
  in the order run -> cancel -> wait -> check -> download.

Exit status (``wait_exit_status``): 0 every batch completed; 3 a batch failed (its input
was refused); 4 a batch expired; 5 a batch was cancelled (the first that applies, in
that order); 1 any other error; 2 bad usage; 130 Ctrl+C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

from datagen.batchapi import batch_cache, batch_queue, batchfile, download, estimates, provenance, retry, submit
from datagen.batchapi.batch_state import IDS_FILE, load_batch_ids, manifest_path, parse_ids, read_ids_file, read_queue
from datagen.batchapi.openai_client import (FINAL, KEY_FILE, Session, file_id_or_none, from_where, request_counts,
                                            validation_errors, wait_exit_status, when)
from datagen.cache import add_cache_args, open_cache
from datagen.common import cli
from datagen.common.errors import UserError

log = logging.getLogger("datagen")


# --- flags ----------------------------------------------------------------------------


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_argument_group("actions (none: list recent batches)")
    cli.add_flag(actions, "run", action="store_true",
                 help="check --file locally, upload it and create a batch (one per part file); "
                      f"the ids go to {IDS_FILE}")
    cli.add_flag(actions, "check", action="store_true", help="print each batch's status, counts, times and errors")
    cli.add_flag(actions, "wait", action="store_true",
                 help="poll until every batch ends; exit 0 completed, 3 failed, 4 expired, 5 cancelled")
    cli.add_flag(actions, "cancel", action="store_true", help="cancel the batches (finished requests are kept)")
    cli.add_flag(actions, "download", metavar="OUTPUT", default=None,
                 help="save the output lines of all batches in OUTPUT and their errors in OUTPUT.errors.jsonl")
    cli.add_flag(actions, "retry_failed", metavar="NEW_INPUT", default=None,
                 help="write the requests of --file that failed or expired to NEW_INPUT, ready for --run")
    which = parser.add_argument_group("which batches and files")
    cli.add_flag(which, "file", default="batchinput.jsonl",
                 help="batch input file for --run/--retry_failed (or its STEM.part-NNN.jsonl parts)")
    cli.add_flag(which, "id", action="append", default=None, metavar="BATCH_ID",
                 help=f"act on this batch (repeatable, or comma-separated) instead of the ids in {IDS_FILE}")
    cli.add_flag(which, "ids_file", default=IDS_FILE, help="where --run saves the batch ids and the others read them")
    cli.add_flag(which, "errors_file", default=None, metavar="ERRORS.jsonl",
                 help="--retry_failed: take the failures from this downloaded error file instead of the API")
    cli.add_flag(which, "description", default=None, help="--run: a note stored in the batch metadata")
    cli.add_flag(which, "force", action="store_true",
                 help="--run: submit even if the same file content already has a batch (you pay twice)")
    cli.add_flag(which, "limit", type=int, default=20, help="how many recent batches the list shows")
    queue = parser.add_argument_group("the queue (--run --wait) and cost")
    cli.add_flag(queue, "max_enqueued_tokens", type=int, default=None, metavar="N",
                 help="--run --wait: the model's enqueued-token limit (see the account's limits page); parts are "
                      "submitted only while they fit, so none is refused")
    cli.add_flag(queue, "max_cost", type=cli.number(0), default=None, metavar="USD",
                 help="--run: refuse when the whole input is estimated over USD (needs both prices)")
    estimates.add_price_args(queue)
    api = parser.add_argument_group("API")
    cli.add_flag(api, "key_file", default=None,
                 help=f"file holding the API key (default: ./{KEY_FILE} if present, else $OPENAI_API_KEY)")
    cli.add_flag(api, "base_url", default=None,
                 help="any OpenAI-compatible Batch API, e.g. https://RESOURCE.openai.azure.com/openai/v1/ "
                      "(default: $OPENAI_BASE_URL, else OpenAI)")
    cli.add_flag(api, "max_retries", type=int, default=5,
                 help="retries on 429, 5xx and dropped connections (the SDK's backoff; downloads restart)")
    cli.add_flag(api, "poll_interval", type=cli.number(0), default=30.0, metavar="SECONDS",
                 help="--wait: seconds between status checks")
    cli.add_flag(api, "json", action="store_true", help="--check: print each batch as raw JSON, one per line")
    add_cache_args(parser)


def check_combination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot mean anything (exit 2, like argparse)."""
    if args.cancel and (args.run or args.download or args.retry_failed):
        parser.error("--cancel goes alone (or with --wait/--check)")
    if args.retry_failed and (args.run or args.download or args.wait):
        parser.error("--retry_failed goes alone; then submit its output with --run --file NEW_INPUT")
    if args.run and args.id:
        parser.error("--run makes new batches; --id is for the other actions")
    if args.run and args.download and not args.wait:
        parser.error("--run --download needs --wait (a new batch has nothing to download yet)")
    if args.max_retries < 0:
        parser.error("--max_retries must be 0 or more")
    if args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.force and not args.run:
        parser.error("--force goes with --run")
    if args.json and not args.check:
        parser.error("--json goes with --check")
    if args.max_enqueued_tokens is not None and not (args.run and args.wait):
        parser.error("--max_enqueued_tokens goes with --run --wait (the queue)")
    if args.max_enqueued_tokens is not None and args.max_enqueued_tokens < 1:
        parser.error("--max_enqueued_tokens must be at least 1")
    if args.max_cost is not None and not args.run:
        parser.error("--max_cost goes with --run")


# --- actions --------------------------------------------------------------------------


def batch_summary(batch) -> str:
    """A human summary of one batch: status, counts, times, files and validation errors."""
    total, completed, failed = request_counts(batch)
    metadata = batch.metadata or {}
    note = ", ".join(f"{k}: {v}" for k, v in metadata.items()
                     if k not in ("source_sha256", "source_file"))  # 64 hex digits say little
    lines = [f"{from_where(batch)}: {batch.status}" + (f"  ({note})" if note else "")]
    lines.append(f"  endpoint {batch.endpoint}" + (f", model {batch.model}" if batch.model else "")
                 + f", window {batch.completion_window}")
    lines.append(f"  requests: {total:,} total, {completed:,} completed, {failed:,} failed")
    stamps = [(name, getattr(batch, f"{name}_at", None)) for name in
              ("created", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")]
    lines.append("  times: " + "; ".join(f"{name} {when(value)}" for name, value in stamps if value))
    if batch.status not in FINAL and batch.expires_at:
        lines.append(f"  expires {when(batch.expires_at)} (unfinished requests are then dropped)")
    lines.append(f"  files: input {batch.input_file_id}, output {file_id_or_none(batch.output_file_id) or '-'}, "
                 f"errors {file_id_or_none(batch.error_file_id) or '-'}")
    usage = batch.usage
    if usage is not None and (usage.total_tokens or 0):
        lines.append(f"  usage: {usage.input_tokens:,} input + {usage.output_tokens:,} output tokens")
    errors = (batch.errors.data if batch.errors and batch.errors.data else [])
    if errors:
        lines.append("  input refused:")
        for error in errors:
            where = f"line {error.line}: " if error.line else ""
            lines.append(f"    {where}{error.code or 'error'}: {error.message}")
    return "\n".join(lines)


def check(session: Session, ids: list[str], as_json: bool) -> list:
    batches = [session.retrieve(batch_id) for batch_id in ids]
    for batch in batches:
        print(json.dumps(batch.to_dict(mode="json"), separators=(",", ":")) if as_json else batch_summary(batch))
    return batches


def cancel(session: Session, ids: list[str]) -> None:
    for batch_id in ids:
        batch = session.retrieve(batch_id)
        if batch.status in FINAL or batch.status == "cancelling":
            print(f"{batch_id}: already {batch.status}; nothing to cancel")
            continue
        batch = session.call(f"cancelling batch {batch_id}", session.client.batches.cancel, batch_id)
        session.expect(f"cancelling batch {batch_id}", batch, "batch")
        total, completed, failed = request_counts(batch)
        print(f"{batch_id}: {batch.status} ({completed + failed:,}/{total:,} requests done; finished ones are kept "
              "in its output file)")


def wait(session: Session, ids: list[str], poll_interval: float, sleep: Callable[[float], None] = time.sleep) -> list:
    """Poll until every batch is final, with a progress bar on the request counts; Ctrl+C
    stops waiting and leaves the batches alone."""
    bar = None
    try:
        batches = {batch_id: session.retrieve(batch_id) for batch_id in ids}
        for batch in batches.values():
            log.info("%s: %s", batch.id, batch.status)
        bar = cli.progress(total=None, desc="requests", unit="req")  # the total is set below, as batches validate
        while True:
            done = sum(request_counts(b)[1] + request_counts(b)[2] for b in batches.values())
            bar.total = sum(request_counts(b)[0] for b in batches.values()) or None
            if done > bar.n:
                bar.update(done - bar.n)
            if all(b.status in FINAL for b in batches.values()):
                break
            sleep(poll_interval)
            for batch_id, old in batches.items():
                if old.status in FINAL:
                    continue
                new = session.retrieve(batch_id)
                if new.status != old.status:
                    total, completed, failed = request_counts(new)
                    log.info("%s: %s -> %s (%s/%s done, %s failed)", batch_id, old.status, new.status,
                             f"{completed + failed:,}", f"{total:,}", f"{failed:,}")
                batches[batch_id] = new
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log.warning("stopped waiting; the batch(es) go on at the API: --check shows them, --wait waits again, "
                    "--cancel cancels them")
        raise
    bar.close()
    for batch in batches.values():
        total, completed, failed = request_counts(batch)
        print(f"{from_where(batch)}: {batch.status} ({completed:,} completed, {failed:,} failed of {total:,})")
        if batch.status == "failed":
            print(f"  input refused: {validation_errors(batch)}")
    return list(batches.values())


def list_recent(session: Session, limit: int) -> None:
    saved: set[str] = set()
    with contextlib.suppress(UserError):
        saved = set(load_batch_ids(session.ids_file))
    rows = session.list_batches(limit)
    if not rows:
        print(f"no batches at {session.url}; submit one with: python batch_utils.py --run --file batchinput.jsonl")
        return
    print(f"{len(rows)} most recent batch(es) at {session.url} (* = saved in {session.ids_file}):")
    width = max(len(batch.id) for batch in rows)
    print(f"  {'batch':<{width}}  {'status':<11} {'created':<23}  {'endpoint':<20} {'completed/failed/total':>22}  "
          "description or input")
    for batch in rows:
        total, completed, failed = request_counts(batch)
        counts = f"{completed:,}/{failed:,}/{total:,}"
        note = (batch.metadata or {}).get("description") or (batch.metadata or {}).get("source_file") or ""
        mark = "*" if batch.id in saved else " "
        print(f"{mark} {batch.id:<{width}}  {batch.status:<11} {when(batch.created_at):<23}  {batch.endpoint:<20} "
              f"{counts:>22}  {note}".rstrip())


# --- the command ----------------------------------------------------------------------


def _protected_paths(args: argparse.Namespace) -> list[Path]:
    """Files a --download must never overwrite: the batch input, its parts, key and ids."""
    source = Path(args.file)
    candidates = [source, *batchfile.existing_parts(source), Path(args.ids_file),
                  manifest_path(args.ids_file), Path(KEY_FILE)]
    if args.key_file:
        candidates.append(Path(args.key_file))
    return [path for path in candidates if path.exists()]


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    check_combination(parser, args)
    session = Session(args.key_file, args.base_url, args.max_retries, args.ids_file)
    try:
        return _run(session, args)
    except Exception as exc:  # no message, traceback or not, may carry the key
        text = session.redact(str(exc))
        if text == str(exc):
            raise
        raise (UserError(text) if isinstance(exc, UserError) else RuntimeError(f"{type(exc).__name__}: {text}")) \
            from None
    finally:
        session.close()


def _run(session: Session, args: argparse.Namespace) -> int:
    cache = open_cache(args) if args.run or args.download else None
    try:
        return _actions(session, args, cache)
    finally:
        if cache is not None:
            cache.close()


def _actions(session: Session, args: argparse.Namespace, cache) -> int:
    if args.retry_failed:
        ids = None if args.errors_file else (parse_ids(args.id) if args.id else load_batch_ids(args.ids_file))
        return retry.retry_failed(session, ids, args.file, args.retry_failed, args.errors_file, track=not args.id)
    if not (args.run or args.check or args.wait or args.cancel or args.download):
        list_recent(session, args.limit)
        return 0
    protected = _protected_paths(args)
    if args.download:  # refuse a bad output path before any upload or wait
        download.download_targets(args.download, protected)
    if args.run and args.wait:
        status = batch_queue.run_queue(session, args, protected, cache)
        if args.check:
            check(session, load_batch_ids(args.ids_file), args.json)
        return status
    if args.run:
        ids = submit.submit_all(session, submit.open_run(session, args, cache), args.description)
    else:
        ids = parse_ids(args.id) if args.id else saved_ids(args)
        if args.download:  # before any wait
            provenance.refuse_other_results(Path(args.download), ids, ", ".join(ids))
    status = 0
    batches = None
    if args.cancel:
        cancel(session, ids)
    if args.wait:
        batches = wait(session, ids, args.poll_interval)
        status = wait_exit_status(batches)
        estimates.report_usage([estimates.usage_of(b) for b in batches], args.input_price, args.output_price)
    if args.check:
        batches = check(session, ids, args.json)
        print_queue_of(args, ids, batches)
    if args.download:
        if batches and all(b.status == "failed" for b in batches):
            return status  # nothing to download; --wait printed why
        answers = batch_cache.answers_for(read_queue(args.ids_file), ids, cache)
        download_status = download.download(session, ids, args.download, batches, protected, answers)
        status = status or download_status
    return status


def saved_ids(args: argparse.Namespace) -> list[str]:
    """The ids file's batch ids; none when the last --run was answered whole by the answer
    cache (its manifest then holds what --download writes)."""
    if args.download and not read_ids_file(args.ids_file).ids:
        manifest = read_queue(args.ids_file)
        if manifest is not None and manifest.parts and all(p.outcome == "cached" for p in manifest.parts):
            return []
    return load_batch_ids(args.ids_file)


def print_queue_of(args: argparse.Namespace, ids: list[str], batches: list) -> None:
    """After --check: the queue of the last --run --wait, when these are its batches."""
    queue = None if args.id or args.json else read_queue(args.ids_file)
    if queue is not None and queue.wait and set(ids) <= {i for part in queue.parts for i in part.batches}:
        batch_queue.print_queue(queue, {b.id: b.status for b in batches})
