"""Writing Batch API input files, split at the limits: ``BatchFileWriter`` streams lines
into temporary files beside the output, starts a new part at each limit (requests,
bytes, estimated tokens) and renames them into place only on ``commit()``;
``DuplicateFinder`` finds repeated ``custom_id``s among millions in little memory.
"""

from __future__ import annotations

import logging
import os
from array import array
from pathlib import Path
from typing import Iterator

from datagen.batchapi.batchfile import MAX_BYTES, MAX_REQUESTS, existing_parts, part_path
from datagen.batchapi.estimates import estimate_tokens
from datagen.common.cli import describe_os_error, held_signals, refuse_non_regular
from datagen.common.errors import UserError
from datagen.common.jsonl import dumps_bytes, temp_path_beside, write_error

log = logging.getLogger("datagen")


class BatchFileWriter:
    """Write batch lines into ``output``, starting a new part at each limit.

    Lines go to temporary files beside ``output``. ``commit()`` renames them into place:
    one part becomes ``output``; several become ``STEM.part-NNN.jsonl`` (and then no
    ``output`` is left, so a stale one cannot be submitted by mistake). ``abort()`` (or
    an exception inside ``with``: SIGTERM, Ctrl+C and a full disk included) removes them.
    Write faults are ``UserError`` naming ``output``; a device or FIFO there is refused.
    ``dry_run=True`` only counts.
    """

    def __init__(self, output: str | os.PathLike, max_requests: int = MAX_REQUESTS,
                 max_bytes: int = MAX_BYTES, dry_run: bool = False, max_tokens: int | None = None):
        if max_requests < 1 or max_bytes < 1 or (max_tokens is not None and max_tokens < 1):
            raise UserError("split limits must be at least 1")
        self.output = Path(output)
        if not dry_run:
            refuse_non_regular(self.output)
        self.max_requests, self.max_bytes, self.dry_run = max_requests, max_bytes, dry_run
        self.max_tokens = max_tokens
        self.temps: list[Path] = []
        self.part_counts: list[int] = []
        self.part_bytes: list[int] = []
        self.part_tokens: list[int] = []  # estimate_tokens of each part's requests
        self.total_bytes = 0
        self._handle = None

    @property
    def count(self) -> int:
        return sum(self.part_counts)

    def _fault(self, exc: OSError) -> UserError:
        return write_error(exc, self.output)

    def _finish_part(self) -> None:
        """Flush, sync and close the part being written."""
        handle, self._handle = self._handle, None
        try:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        except OSError as exc:
            try:
                handle.close()  # the file descriptor at least
            except OSError:
                pass
            raise self._fault(exc) from None

    def _start_part(self) -> None:
        if self._handle:
            self._finish_part()
        if not self.dry_run:
            with held_signals():  # recorded for abort() before a signal can stop us
                tmp = temp_path_beside(self.output)
                self.temps.append(tmp)
            try:
                self._handle = open(tmp, "wb")
            except OSError as exc:
                raise self._fault(exc) from None
        self.part_counts.append(0)
        self.part_bytes.append(0)
        self.part_tokens.append(0)

    def add(self, line: dict, where: str = "") -> None:
        data = dumps_bytes(line) + b"\n"
        size = len(data)
        tokens = estimate_tokens(line["url"], line["body"])
        if size > self.max_bytes:
            raise UserError(f"{where}: this request alone is {size:,} bytes, over the {self.max_bytes:,}-byte "
                            "file limit; shorten the prompt")
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise UserError(f"{where}: this request alone is about {tokens:,} tokens (input + its output cap), over "
                            f"--max_tokens_per_file {self.max_tokens:,}; raise it or lower --max_tokens")
        if not self.part_counts or self.part_counts[-1] >= self.max_requests \
                or self.part_bytes[-1] + size > self.max_bytes \
                or (self.max_tokens is not None and self.part_tokens[-1] + tokens > self.max_tokens):
            self._start_part()
        if self._handle:
            try:
                self._handle.write(data)
            except OSError as exc:  # disk full: a write error names no file
                raise self._fault(exc) from None
        self.part_counts[-1] += 1
        self.part_bytes[-1] += size
        self.part_tokens[-1] += tokens
        self.total_bytes += size

    def planned_paths(self) -> list[Path]:
        if len(self.part_counts) <= 1:
            return [self.output]
        return [part_path(self.output, i) for i in range(1, len(self.part_counts) + 1)]

    def commit(self) -> list[Path]:
        """Move the finished parts into place and remove stale outputs of earlier runs.

        A signal during the renames waits until they are all done: the parts on disk are
        always those of one run.
        """
        if self._handle:
            self._finish_part()
        if self.dry_run:
            return self.planned_paths()
        finals = self.planned_paths()
        for final in finals:
            refuse_non_regular(final)  # never rename over a device
        stale = [p for p in existing_parts(self.output) if p not in finals]
        if len(finals) > 1 and self.output.exists():
            stale.append(self.output)
        with held_signals():
            try:
                for tmp, final in zip(self.temps, finals):
                    os.replace(tmp, final)
                self.temps = []
                for path in stale:
                    log.info("removing %s left by an earlier run", path)
                    path.unlink()
            except OSError as exc:
                raise UserError(describe_os_error(exc)) from None
        return finals

    def abort(self) -> None:
        """Remove the temporary parts; never fails (it runs while another error unwinds)."""
        with held_signals():  # a second signal must not cut the cleanup short
            if self._handle:
                try:
                    self._handle.close()
                except OSError:  # flushing again on a full disk fails again; the fd is closed
                    pass
                self._handle = None
            for tmp in self.temps:
                tmp.unlink(missing_ok=True)
            self.temps = []

    def __enter__(self) -> "BatchFileWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.abort()


class DuplicateFinder:
    """Finds repeated ids among millions with 8 bytes of memory per id.

    ``add`` stores a 64-bit hash per id; ``first_duplicate`` sorts the hashes once and
    returns the positions of the first colliding pair, which the caller confirms.
    """

    def __init__(self) -> None:
        self.hashes = array("q")

    def add(self, key: str) -> None:
        self.hashes.append(hash(key))

    def candidates(self) -> Iterator[tuple[int, int]]:
        """Pairs of positions whose hashes are equal, earliest second position first."""
        import numpy as np

        if len(self.hashes) < 2:
            return
        values = np.frombuffer(self.hashes, dtype=np.int64)
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        same = np.nonzero(ordered[1:] == ordered[:-1])[0]
        yield from sorted(((int(order[i]), int(order[i + 1])) for i in same), key=lambda pair: pair[1])
