"""``batch_utils.py --retry_failed NEW_INPUT``: the requests of a batch input that failed
or expired, as a new batch input ready for ``--run``.

The failures come from the batches' error files at the API (less those a retry batch
among them answered) or from a downloaded error file (``--errors_file``). With the ids
file, its ``--run`` adds the retry batches beside the originals (a ``# retry:`` note in
``last_batch_id.tok``), so one ``--download`` merges both.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from datagen.batchapi import batchfile
from datagen.batchapi.batch_state import read_ids_file, save_batch_ids
from datagen.batchapi.batch_writer import BatchFileWriter
from datagen.batchapi.openai_client import FINAL, Session, error_code, file_id_or_none, is_success, validation_errors
from datagen.common import cli
from datagen.common.errors import UserError
from datagen.common.jsonl import iter_jsonl_objects, sha256_file


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
    with BatchFileWriter(output_path) as writer:
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
        save_batch_ids(ids_file, saved.ids, {**saved.pending, **{sha256_file(p): p.name for p in paths}})
        print(f"{ids_file} keeps the {len(saved.ids)} original batch id(s); that --run adds the retry batches "
              "beside them")
    return 0
