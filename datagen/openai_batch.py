"""The OpenAI Batch API route: every batch action behind batch_utils.py (the key, the
ids file and the client are in ``datagen.openai_client``).

- Actions: ``submit`` (check locally, refuse a file already submitted, upload, create;
  one batch per part file), ``check``, ``wait`` (poll to a final state with a progress
  bar), ``cancel``, ``download`` (stream output and error files of all batches into
  OUTPUT and OUTPUT.errors.jsonl, atomically; never onto a batch input or the results
  of other batches), ``retry_failed`` (a new batch input holding the requests that
  failed or expired), ``list_recent``.
- Each batch's metadata records its input file's name and sha256 (``source_file``,
  ``source_sha256``): ``--run`` refuses a file whose content already has a live or
  completed batch among the saved ids and the recent batches, unless ``--force``. Each
  created batch is appended to the history, and a download writes its provenance sidecar
  (``datagen.provenance``).
- ``--run --wait`` goes through the queue (``datagen.batch_queue``): parts are submitted
  as they fit the enqueued-token limit, refused ones again as earlier batches end, and a
  rerun continues from the manifest beside the ids file.
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
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from datagen import batch_queue, batchfile, cli, provenance
from datagen.errors import UserError
from datagen.jsonl import iter_jsonl_objects, temp_path_beside
from datagen.openai_client import (IDS_FILE, KEY_FILE, Session, check_state_path, error_code, file_id_or_none,
                                   is_success, load_batch_ids, parse_ids, read_ids_file, request_counts,
                                   save_batch_ids, sha256_of, validation_errors, when)

log = logging.getLogger("datagen")

FINAL = ("completed", "failed", "expired", "cancelled")
BLOCKING = ("validating", "in_progress", "finalizing", "completed")  # an earlier batch that --run must not repeat
EXIT_STATUS = {"completed": 0, "failed": 3, "expired": 4, "cancelled": 5}
RECENT = 100  # how many recent batches --run looks through for an earlier submission


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
    batchfile.add_price_args(queue)
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


def describe(batch) -> str:
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


def submit(session: Session, input_path: str, description: str | None, force: bool = False) -> list[str]:
    """Check every part locally, refuse one already submitted (unless ``force``), then
    upload and create one batch per part. The ids file is rewritten after each batch, so
    a failure half-way keeps the ids made so far; the ``--run`` of a ``--retry_failed``
    file adds its ids beside the originals."""
    if description is not None and len(description) > 512:
        raise UserError(f"--description is {len(description)} characters; batch metadata values hold at most 512")
    files = batchfile.resolve_batch_files(input_path)
    summaries = [batchfile.check_batch_file(path) for path in files]
    saved = read_ids_file(session.ids_file)
    ids_file = check_state_path(session.ids_file)
    digests = {summary.path: sha256_of(summary.path) for summary in summaries}
    client = session.client
    if not force:
        refuse_resubmission(session, digests, saved.ids)
    retry_of = saved.ids if any(digest in saved.pending for digest in digests.values()) else []
    pending = {d: name for d, name in saved.pending.items() if d not in digests.values()} if retry_of else {}
    if saved.ids and not retry_of:
        log.info("replacing the ids saved in %s (%s)", ids_file, ", ".join(saved.ids))
    ids: list[str] = []
    for summary in summaries:
        path = summary.path
        metadata = {"source_file": path.name[:512], "source_sha256": digests[path]}
        if description:
            metadata["description"] = description
        if retry_of:  # a marker (cut at 512) for --retry_failed: read this batch's successes too
            metadata["retry_of"] = ",".join(retry_of)[:512]
        try:
            with open(path, "rb") as handle:  # streamed by the SDK, rewound on a retry
                uploaded = session.call(f"uploading {path}", client.files.create,
                                        file=(path.name, handle), purpose="batch")
            session.expect(f"uploading {path}", uploaded, "file")
            batch = session.call(f"creating the batch for {path}", client.batches.create,
                                 input_file_id=uploaded.id, endpoint=summary.url, completion_window="24h",
                                 metadata=metadata)
            session.expect(f"creating the batch for {path}", batch, "batch")
        except UserError as exc:
            if ids:
                raise UserError(f"{exc} ({len(ids)} batch(es) made before this one are saved in {ids_file}: "
                                "check or cancel them)") from None
            raise
        ids.append(batch.id)
        save_batch_ids(ids_file, retry_of + ids, pending)
        provenance.record_batch(ids_file, batch.id, path.name, digests[path], summary.model, retry_of)
        print(f"submitted {batch.id} for {path} ({summary.requests:,} requests, {summary.url}, {summary.model})")
    after = f", after the {len(retry_of)} batch(es) they retry" if retry_of else ""
    print(f"saved {len(ids)} batch id(s) in {ids_file}{after}")
    return ids


def refuse_resubmission(session: Session, digests: dict[Path, str], saved_ids: list[str]) -> None:
    """Refuse when a file's content already has a batch that is live or completed, among
    the saved ids and the recent batches (a failed, expired or cancelled one does not count)."""
    earlier = [batch for batch in (session.retrieve(i, missing_ok=True) for i in saved_ids) if batch is not None]
    recent = session.list_batches(RECENT, f"looking for earlier batches of {', '.join(map(str, digests))}", True)
    if recent is None:  # some OpenAI-compatible services cannot list batches
        log.warning("%s cannot list batches: only the ids in %s were checked for an earlier submission of the same "
                    "file", session.url, session.ids_file)
    earlier += recent or []
    by_digest = {digest: path for path, digest in digests.items()}
    for batch in earlier:
        metadata = batch.metadata if isinstance(batch.metadata, dict) else {}
        path = by_digest.get(metadata.get("source_sha256"))
        if path is not None and batch.status in BLOCKING:
            raise UserError(f"{path} was already submitted as batch {batch.id} ({batch.status}); download its "
                            f"results with: python batch_utils.py --wait --download {path.name.split('.')[0]}"
                            f".results.jsonl --id {batch.id} "
                            "(or --check --id), or pass --force to submit it again (you pay twice)")


def check(session: Session, ids: list[str], as_json: bool) -> list:
    batches = [session.retrieve(batch_id) for batch_id in ids]
    for batch in batches:
        print(json.dumps(batch.to_dict(mode="json"), separators=(",", ":")) if as_json else describe(batch))
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


def wait_exit_status(batches: list) -> int:
    statuses = {b.status for b in batches}
    for status in ("failed", "expired", "cancelled"):
        if status in statuses:
            return EXIT_STATUS[status]
    return 0


def errors_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def download_targets(output: str | os.PathLike, protected: Iterable[Path]) -> tuple[Path, Path]:
    """OUTPUT and OUTPUT.errors.jsonl, each refused if it is an input, a batch input (its
    first line is a request line), a folder or a device (a rename would replace the node;
    removing a stale errors file would too)."""
    output = cli.check_output_path(output, protected, flag="--download")
    errors_path = cli.check_output_path(errors_path_for(output), protected, flag="--download")
    for path in (output, errors_path):
        if path.is_file() and batchfile.is_batch_input(path):
            raise UserError(f"--download {path} is a batch input (its first line is an OpenAI request line) and "
                            f"would be overwritten; choose another name, e.g. --download "
                            f"{provenance.results_name(output)}")
    return output, errors_path


def download(session: Session, ids: list[str], output: str | os.PathLike, batches: list | None = None,
             protected: Iterable[Path] = ()) -> int:
    """Save the output lines of every batch in OUTPUT and their error lines in
    OUTPUT.errors.jsonl: streamed, both written to temporary files and renamed at the end.

    Returns 0, or 3 when a batch failed validation (it has nothing to download).
    """
    output, errors_path = download_targets(output, protected)
    batches = batches or [session.retrieve(batch_id) for batch_id in ids]
    for batch in batches:
        if batch.status not in FINAL:
            total, completed, failed = request_counts(batch)
            raise UserError(f"batch {batch.id} is {batch.status} ({completed + failed:,}/{total:,} requests done); "
                            "nothing to download yet: wait for it with --wait (or cancel it with --cancel to keep "
                            "what is finished)")
    refused = [b for b in batches if b.status == "failed"]
    for batch in refused:
        message = f"batch {batch.id} failed: its input was refused ({validation_errors(batch)}); it has no results"
        if len(refused) == len(batches):
            raise UserError(message + "; fix the input file and --run it again")
        log.warning("%s", message)
    provenance.refuse_batch_sources(output, batches, session.ids_file)
    provenance.refuse_other_results(output, [b.id for b in batches], ", ".join(map(from_where, batches)))
    for batch in batches:
        print(f"downloading {from_where(batch)}: {batch.status}", flush=True)
    sidecar = provenance.sidecar_path(output)
    cli.check_output_path(sidecar, protected, flag="--download")
    out_tmp = err_tmp = side_tmp = None
    out_lines = err_lines = 0
    try:
        with cli.held_signals():  # each temporary file recorded for cleanup as it is made
            out_tmp = temp_path_beside(output)
            err_tmp = temp_path_beside(errors_path)
            side_tmp = temp_path_beside(sidecar)
        provenance.write_sidecar(side_tmp, session, batches)
        with open(out_tmp, "wb") as out, open(err_tmp, "wb") as err:
            for batch in batches:
                if file_id_or_none(batch.output_file_id):
                    lines, size = session.stream_file(batch.output_file_id, out, f"the output of {batch.id}")
                    out_lines += lines
                    log.info("%s: %s output lines (%s bytes)", batch.id, f"{lines:,}", f"{size:,}")
                elif batch.status != "failed":
                    log.info("%s: no output file (no request finished successfully)", batch.id)
                if file_id_or_none(batch.error_file_id):
                    lines, _ = session.stream_file(batch.error_file_id, err, f"the errors of {batch.id}")
                    err_lines += lines
            for handle in (out, err):
                handle.flush()
                os.fsync(handle.fileno())
        codes = Counter(error_code(line) for _, line in iter_jsonl_objects(err_tmp)) if err_lines else Counter()
        with cli.held_signals():  # the three files move together: results never sit beside another's sidecar
            if errors_path.exists():
                log.info("removing %s from an earlier download", errors_path)
                errors_path.unlink()
            if err_lines:
                os.replace(err_tmp, errors_path)
            os.replace(side_tmp, sidecar)
            os.replace(out_tmp, output)
    finally:
        for tmp in (out_tmp, err_tmp, side_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    merged = f" (from {len(batches)} batches)" if len(batches) > 1 else ""
    print(f"saved {out_lines:,} output lines to {output}{merged}")
    if err_lines:
        detail = ", ".join(f"{count:,} {code}" for code, count in codes.most_common())
        print(f"saved {err_lines:,} failed requests to {errors_path} ({detail}); rebuild them with --retry_failed")
    else:
        print("no failed requests")
    return EXIT_STATUS["failed"] if refused else 0


def from_where(batch) -> str:
    """``batch_x (from judge.jsonl)``: a batch and the input file it was made from."""
    metadata = batch.metadata if isinstance(batch.metadata, dict) else {}
    return f"{batch.id} (from {metadata['source_file']})" if metadata.get("source_file") else batch.id


def failed_ids_from_api(session: Session, ids: list[str]) -> dict[str, str]:
    """custom_id -> error code of every request the batches did not finish, less those
    that a retry batch (metadata ``retry_of``) among them answered."""
    failed: dict[str, str] = {}
    answered: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="batch-files-") as folder:
        def fetch(file_id: str, label: str) -> Path:
            path = Path(folder) / f"{file_id}.jsonl"
            with open(path, "wb") as handle:
                session.stream_file(file_id, handle, label)
            return path

        for batch_id in ids:
            batch = session.retrieve(batch_id)
            if batch.status == "failed":
                raise UserError(f"batch {batch_id} failed as a whole ({validation_errors(batch)}); fix the input "
                                "and --run it again (--retry_failed rebuilds requests that failed inside a batch)")
            if batch.status not in FINAL:
                raise UserError(f"batch {batch_id} is {batch.status}; wait for it with --wait before --retry_failed")
            if file_id_or_none(batch.error_file_id):
                failed.update(_failures(fetch(batch.error_file_id, f"the errors of {batch_id}")))
            retry = isinstance(batch.metadata, dict) and batch.metadata.get("retry_of")
            if retry and file_id_or_none(batch.output_file_id):
                output = fetch(batch.output_file_id, f"the output of {batch_id}")
                answered.update(line.get("custom_id") for _, line in iter_jsonl_objects(output) if is_success(line))
    return {custom_id: code for custom_id, code in failed.items() if custom_id not in answered}


def _failures(path: Path) -> dict[str, str]:
    failed = {}
    for line_number, line in iter_jsonl_objects(path):
        if not is_success(line):
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str):
                raise UserError(f"{path}:{line_number}: no custom_id; is this a Batch API error file?")
            failed[custom_id] = error_code(line)
    return failed


def retry_failed(session: Session, ids: list[str] | None, input_path: str, output: str,
                 errors_file: str | None, track: bool = True) -> int:
    """Write the requests of the input that failed or expired to ``output`` (split at the limits).

    With ``track`` (the batches came from the ids file), the ids file keeps the original
    ids and notes the new file's sha256, so that its ``--run`` adds the retry batches
    beside them instead of replacing them.
    """
    inputs = batchfile.resolve_batch_files(input_path)
    output_path = cli.check_output_path(output, inputs, flag="--retry_failed")
    if output_path.suffix != ".jsonl":
        raise UserError(f"--retry_failed {output_path}: the Batch API takes .jsonl files only; end the name in .jsonl")
    ids_file = Path(session.ids_file)
    saved = read_ids_file(ids_file) if track else None  # a bad ids file is refused before any work
    failed = _failures(Path(errors_file)) if errors_file else failed_ids_from_api(session, ids or [])
    if not failed:
        print("no failed or expired requests; nothing to retry")
        return 0
    found: set[str] = set()
    with batchfile.BatchFileWriter(output_path) as writer:
        for path in inputs:
            for request in batchfile.iter_batch_requests(path):
                if request.custom_id in failed and request.custom_id not in found:
                    writer.add(batchfile.build_line(request.custom_id, request.url, request.body), request.where)
                    found.add(request.custom_id)
        missing = [custom_id for custom_id in failed if custom_id not in found]
        if missing:
            raise UserError(f"{len(missing):,} failed custom_id(s) are not in {input_path} (e.g. {missing[0]!r}); "
                            "pass the --file the batches were made from")
        paths = writer.commit()
    codes = Counter(failed.values())
    detail = ", ".join(f"{count:,} {code}" for code, count in codes.most_common())
    print(f"wrote {writer.count:,} requests that failed or expired ({detail}) to "
          f"{', '.join(map(str, paths))}; submit them with: python batch_utils.py --run --file {output_path}")
    if saved is not None and saved.ids:
        save_batch_ids(ids_file, saved.ids, {**saved.pending, **{sha256_of(p): p.name for p in paths}})
        print(f"{ids_file} keeps the {len(saved.ids)} original batch id(s); that --run adds the retry batches "
              "beside them")
    return 0


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
                  batch_queue.manifest_path(args.ids_file), Path(KEY_FILE)]
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
    if args.retry_failed:
        ids = None if args.errors_file else (parse_ids(args.id) if args.id else load_batch_ids(args.ids_file))
        return retry_failed(session, ids, args.file, args.retry_failed, args.errors_file, track=not args.id)
    if not (args.run or args.check or args.wait or args.cancel or args.download):
        list_recent(session, args.limit)
        return 0
    protected = _protected_paths(args)
    if args.download:  # refuse a bad output path before any upload or wait
        download_targets(args.download, protected)
    if args.run and args.wait:
        status = batch_queue.run_queue(session, args, protected)
        if args.check:
            check(session, load_batch_ids(args.ids_file), args.json)
        return status
    if args.run:
        if args.max_cost is not None:
            batch_queue.check_cost(batch_queue.plan_parts(args.file), args.max_cost, args.input_price,
                                   args.output_price)
        ids = submit(session, args.file, args.description, args.force)
    else:
        ids = parse_ids(args.id) if args.id else load_batch_ids(args.ids_file)
        if args.download:  # before any wait
            provenance.refuse_other_results(Path(args.download), ids, ", ".join(ids))
    status = 0
    batches = None
    if args.cancel:
        cancel(session, ids)
    if args.wait:
        batches = wait(session, ids, args.poll_interval)
        status = wait_exit_status(batches)
        batch_queue.report_usage([batch_queue.usage_of(b) for b in batches], args.input_price, args.output_price)
    if args.check:
        batches = check(session, ids, args.json)
        queue = None if args.id or args.json else batch_queue.read_queue(args.ids_file)
        if queue is not None and set(ids) <= {i for part in queue.parts for i in part.batches}:  # not a stale one
            batch_queue.print_queue(queue, {b.id: b.status for b in batches})
    if args.download:
        if batches is not None and all(b.status == "failed" for b in batches):
            return status  # nothing to download; --wait printed why
        download_status = download(session, ids, args.download, batches, protected)
        status = status or download_status
    return status
