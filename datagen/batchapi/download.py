"""``batch_utils.py --download OUTPUT``: the output lines of every batch in OUTPUT and their
error lines in OUTPUT.errors.jsonl, with the provenance sidecar beside them.

Streamed into temporary files and renamed into place together at the end, so the three
files are whole and of one download; never written onto a batch input, an input of the
run, or the results of other batches (``datagen.batchapi.provenance``). A dropped
connection restarts the file (``Session.stream_file``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from datagen.batchapi import batchfile, provenance
from datagen.batchapi.batch_cache import CachedLines, RunAnswers
from datagen.batchapi.openai_client import (EXIT_STATUS, FINAL, Session, error_code, file_id_or_none, from_where,
                                            request_counts, validation_errors)
from datagen.common import cli
from datagen.common.errors import UserError
from datagen.common.jsonl import iter_jsonl_objects, temp_path_beside

log = logging.getLogger("datagen")


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


def refuse_unfinished(batches: list) -> list:
    """Refuse batches that have not ended; warn of those whose input was refused (they have
    no results) and return them; refuse when every batch is such."""
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
    return refused


def stream_batches(session: Session, batches: list, out, err) -> tuple[int, int, dict[str, tuple]]:
    """Append every batch's output file to ``out`` and error file to ``err``, synced;
    returns (output lines, error lines, batch id -> the byte ranges of its lines in both)."""
    out_lines = err_lines = 0
    spans = {}
    for batch in batches:
        out_start, err_start = out.tell(), err.tell()
        if file_id_or_none(batch.output_file_id):
            lines, size = session.stream_file(batch.output_file_id, out, f"the output of {batch.id}")
            out_lines += lines
            log.info("%s: %s output lines (%s bytes)", batch.id, f"{lines:,}", f"{size:,}")
        elif batch.status != "failed":
            log.info("%s: no output file (no request finished successfully)", batch.id)
        if file_id_or_none(batch.error_file_id):
            lines, _ = session.stream_file(batch.error_file_id, err, f"the errors of {batch.id}")
            err_lines += lines
        spans[batch.id] = (out_start, out.tell(), err_start, err.tell())
    for handle in (out, err):
        handle.flush()
        os.fsync(handle.fileno())
    return out_lines, err_lines, spans


def move_into_place(out_tmp: Path, err_tmp: Path, side_tmp: Path, output: Path, errors_path: Path,
                    sidecar: Path, has_errors: bool) -> None:
    """The three files move together: results never sit beside another's sidecar."""
    with cli.held_signals():
        if errors_path.exists():
            log.info("removing %s from an earlier download", errors_path)
            errors_path.unlink()
        if has_errors:
            os.replace(err_tmp, errors_path)
        os.replace(side_tmp, sidecar)
        os.replace(out_tmp, output)


def download(session: Session, ids: list[str], output: str | os.PathLike, batches: list | None = None,
             protected: Iterable[Path] = (), answers: RunAnswers | None = None) -> int:
    """Save the output lines of every batch in OUTPUT and their error lines in
    OUTPUT.errors.jsonl; with ``answers`` (the run's manifest), put the new answers in the
    answer cache and add the cached answers of the lines not uploaded to OUTPUT. Returns
    0, or 3 when a batch failed validation (it has nothing to download)."""
    output, errors_path = download_targets(output, protected)
    batches = batches or [session.retrieve(batch_id) for batch_id in ids]
    if not batches and answers is None:
        raise UserError("no batch to download; pass --id BATCH_ID")
    refused = refuse_unfinished(batches)
    provenance.refuse_batch_sources(output, batches, session.ids_file)
    provenance.refuse_other_results(output, [b.id for b in batches], ", ".join(map(from_where, batches)))
    for batch in batches:
        print(f"downloading {from_where(batch)}: {batch.status}", flush=True)
    sidecar = provenance.sidecar_path(output)
    cli.check_output_path(sidecar, protected, flag="--download")
    out_tmp = err_tmp = side_tmp = None
    try:
        with cli.held_signals():  # each temporary file recorded for cleanup as it is made
            out_tmp = temp_path_beside(output)
            err_tmp = temp_path_beside(errors_path)
            side_tmp = temp_path_beside(sidecar)
        with open(out_tmp, "wb") as out, open(err_tmp, "wb") as err:
            out_lines, err_lines, spans = stream_batches(session, batches, out, err)
            cached = answers.complete(out, out_tmp, err_tmp, spans, batches, output) if answers else CachedLines()
            if cached.lines:
                out.flush()
                os.fsync(out.fileno())
        provenance.write_sidecar(side_tmp, session, batches, cached.sidecar() if cached.lines else None)
        codes = Counter(error_code(line) for _, line in iter_jsonl_objects(err_tmp)) if err_lines else Counter()
        move_into_place(out_tmp, err_tmp, side_tmp, output, errors_path, sidecar, bool(err_lines))
    finally:
        for tmp in (out_tmp, err_tmp, side_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    report_download(output, errors_path, len(batches), out_lines, err_lines, codes, cached)
    return EXIT_STATUS["failed"] if refused else 0


def report_download(output: Path, errors_path: Path, batches: int, out_lines: int, err_lines: int,
                    codes: Counter, cached: CachedLines | None = None) -> None:
    merged = f" (from {batches} batches)" if batches > 1 else ""
    if cached is not None and cached.lines:
        origin = sorted(b for b in cached.batches if b)
        shown = ", ".join(origin[:3]) + (f" and {len(origin) - 3} more" if len(origin) > 3 else "")
        merged = (f" ({out_lines:,} from {batches} batch(es), " if batches else " (") + \
            f"{cached.lines:,} from the answer cache, first answered by {shown or 'unknown batches'})"
        out_lines += cached.lines
    print(f"saved {out_lines:,} output lines to {output}{merged}")
    if err_lines:
        detail = ", ".join(f"{count:,} {code}" for code, count in codes.most_common())
        print(f"saved {err_lines:,} failed requests to {errors_path} ({detail}); rebuild them with --retry_failed")
    else:
        print("no failed requests")
