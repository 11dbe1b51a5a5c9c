"""The on-disk store of a reformat run: results and original requests in a temporary SQLite database.

``ResultStore`` appends each result's record to a spool file and indexes it in SQLite under
``$TMPDIR``, beside the original requests and their kept fields, so that shuffled results
can be put back in the input order (or the natural order of their ids, ``natural_key``),
deduplicated (``pick``), joined to their metadata and checked for missing ids with flat
memory. ``datagen.compare`` builds on it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from datagen.errors import UserError


_DIGITS = re.compile(r"[0-9]+")


def _pad_number(match: re.Match) -> str:
    digits = match.group().lstrip("0") or "0"
    return f"{min(len(digits), 99):02d}{digits}"


def natural_key(custom_id: str) -> str:
    """A sort key where digit runs compare as numbers: request-2 before request-10."""
    return _DIGITS.sub(_pad_number, custom_id)


class ResultStore:
    """Results (and the original requests) on disk, for ordering, deduplication and
    missing-id checks without holding them in memory.

    Each result's output record is appended to a spool file; a temporary SQLite
    database holds one small row per result (custom_id, ok, offset, length) and one per
    original request (position, custom_id, kept fields). Both live in a folder under
    ``$TMPDIR`` (or ``tmp_dir``) that ``close()`` removes, on every way out: errors,
    SIGTERM (``cli.Terminated``) and Ctrl+C included. A full disk there (SQLite's
    "database or disk is full", or a failed spool write) is a ``UserError`` naming the folder.
    """

    BATCH = 10_000

    def __init__(self, tmp_dir: str | None = None):
        from datagen.cli import held_signals

        self.tmp_dir = Path(tmp_dir or tempfile.gettempdir())
        self.folder = self.spool = self.db = None
        self.spool_size = 0
        self.has_inputs = False
        self.indexed = False
        try:
            with self._faults():
                with held_signals():  # recorded for close() before a signal can stop us
                    self.folder = Path(tempfile.mkdtemp(prefix="reformat-results-", dir=self.tmp_dir))
                self.spool = open(self.folder / "records.bin", "w+b")
                self.db = sqlite3.connect(self.folder / "index.sqlite", isolation_level=None)
                self.db.create_function("natural_key", 1, natural_key, deterministic=True)
                for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                               "cache_size = -32768", "temp_store = FILE"):
                    self.db.execute(f"PRAGMA {pragma}")
                self.db.execute("CREATE TABLE results (custom_id TEXT NOT NULL, ok INTEGER NOT NULL, "
                                "offset INTEGER NOT NULL, length INTEGER NOT NULL, file INTEGER, variant TEXT, "
                                "asked TEXT)")
                self.db.execute("CREATE TABLE inputs (pos INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, "
                                "src TEXT NOT NULL, keep BLOB, asked TEXT)")
                self.db.execute("CREATE TABLE meta (pos INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, "
                                "src TEXT NOT NULL, keep BLOB)")
        except BaseException:
            self.close()
            raise

    def _fault(self, exc: Exception) -> UserError:
        """A fault of the temporary folder (SQLite or OS) as one line naming it."""
        import errno

        from datagen.cli import describe_os_error

        if isinstance(exc, sqlite3.OperationalError):
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL and "full" not in str(exc):
                return UserError(f"temporary folder {self.tmp_dir}: SQLite error ({exc}); "
                                 "point TMPDIR at a local, writable folder")
            exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return UserError(f"temporary folder (TMPDIR) {describe_os_error(exc, self.tmp_dir)}")

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.OperationalError, OSError) as exc:
            raise self._fault(exc) from None

    def close(self) -> None:
        """Remove the folder and all in it; safe to call twice, never fails."""
        from datagen.cli import held_signals

        with held_signals():  # a second signal must not leave the folder behind
            for thing in (self.db, self.spool):
                with contextlib.suppress(Exception):
                    thing.close()
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "ResultStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _insert(self, sql: str, rows: Iterable[tuple]) -> int:
        # Only SQLite's errors are the folder's: ``rows`` reads the user's files.
        count, batch = 0, []
        try:
            self.db.execute("BEGIN")
            for row in rows:
                batch.append(row)
                if len(batch) >= self.BATCH:
                    self.db.executemany(sql, batch)
                    count += len(batch)
                    batch.clear()
            if batch:
                self.db.executemany(sql, batch)
                count += len(batch)
            self.db.execute("COMMIT")  # not on failure: the store is thrown away then
        except sqlite3.OperationalError as exc:
            raise self._fault(exc) from None
        return count

    def _spooled(self, rows: Iterable[tuple]) -> Iterator[tuple]:
        """``(custom_id, ok, record, *more)`` -> ``(custom_id, ok, offset, length, *more)``."""
        write, offset = self.spool.write, self.spool_size
        for custom_id, ok, record, *more in rows:
            try:
                write(record)
            except OSError as exc:  # disk full: a write error names no file
                raise self._fault(exc) from None
            yield custom_id, ok, offset, len(record), *more
            offset += len(record)
        self.spool_size = offset

    def add_results(self, rows: Iterable[tuple[str, bool, bytes, int, str | None, str | None]]) -> int:
        """``(custom_id, ok, record_json_bytes, file_number, variant, asked)`` rows, in reading order
        (``variant``: the generation fingerprint, ``datagen.result_runs.variant``; ``asked``: a
        fine-tuned record's ``request_sha256``)."""
        return self._insert("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", self._spooled(rows))

    def add_inputs(self, rows: Iterable[tuple[str, str, bytes | None, str | None]]) -> int:
        """``(custom_id, where, keep_json_bytes, asked)`` rows of the original requests, in order
        (``asked``: ``prompts.request_digest`` of the request, or None)."""
        self.has_inputs = True
        return self._insert("INSERT INTO inputs (custom_id, src, keep, asked) VALUES (?, ?, ?, ?)", rows)

    def add_metadata(self, rows: Iterable[tuple[str, str, bytes | None]]) -> int:
        """``(custom_id, where, keep_json_bytes)`` rows joined to the inputs by custom_id."""
        return self._insert("INSERT INTO meta (custom_id, src, keep) VALUES (?, ?, ?)", rows)

    def _index(self) -> None:
        if not self.indexed:
            with self._faults():
                self.db.execute("CREATE INDEX results_by_id ON results (custom_id, ok DESC)")
                self.db.execute("CREATE INDEX inputs_by_id ON inputs (custom_id)")
                self.db.execute("CREATE INDEX meta_by_id ON meta (custom_id)")
            self.indexed = True

    def unmatched_inputs(self) -> int:
        """Inputs whose custom_id the metadata does not have."""
        self._index()
        with self._faults():
            return self.db.execute("SELECT COUNT(*) FROM inputs i WHERE NOT EXISTS "
                                   "(SELECT 1 FROM meta m WHERE m.custom_id = i.custom_id)").fetchone()[0]

    def check_unique_inputs(self, flag: str, table: str = "inputs") -> None:
        self._index()
        with self._faults():
            row = self.db.execute(f"SELECT custom_id FROM {table} GROUP BY custom_id HAVING COUNT(*) > 1 "
                                  "ORDER BY MIN(pos) LIMIT 1").fetchone()
            if row:
                first, second = [r[0] for r in self.db.execute(
                    f"SELECT src FROM {table} WHERE custom_id = ? ORDER BY pos LIMIT 2", row)]
        if row:
            raise UserError(f"{second}: duplicate custom_id {row[0]!r} in {flag} (first at {first}); "
                            "ids must be unique to join results to requests")

    ANSWERS = ("results", "file")  # the table of answers and the column naming their file

    def has_asked(self) -> bool:
        """Some answer says what it asked (a fine-tuned record's ``request_sha256``)."""
        with self._faults():
            return self.db.execute(f"SELECT 1 FROM {self.ANSWERS[0]} WHERE asked IS NOT NULL "
                                   "LIMIT 1").fetchone() is not None

    def asked_elsewhere(self) -> tuple | None:
        """The first answer (in input order) made for another request than the input of its
        id: ``(file, custom_id, where, mismatched, checked)``, the counts over that file's
        answers that say what they asked; None when all of them match."""
        self._index()
        table, file = self.ANSWERS
        joined = (f"FROM {table} r JOIN inputs i ON i.custom_id = r.custom_id "
                  "WHERE r.asked IS NOT NULL AND i.asked IS NOT NULL")
        with self._faults():
            first = self.db.execute(f"SELECT r.{file}, r.custom_id, i.src {joined} AND r.asked != i.asked "
                                    "ORDER BY i.pos, r.rowid LIMIT 1").fetchone()
            if first is None:
                return None
            counts = self.db.execute("SELECT COUNT(DISTINCT CASE WHEN r.asked != i.asked THEN r.custom_id END), "
                                     f"COUNT(DISTINCT r.custom_id) {joined} AND r.{file} = ?", first[:1]).fetchone()
        return (*first, *counts)

    def extra_count(self) -> int:
        self._index()
        with self._faults():
            return self.db.execute("SELECT COUNT(DISTINCT custom_id) FROM results r WHERE NOT EXISTS "
                                   "(SELECT 1 FROM inputs i WHERE i.custom_id = r.custom_id)").fetchone()[0]

    def rows(self) -> Iterator[tuple]:
        """``(custom_id, keep_json, ok, offset, length, meta_keep_json, variant, file)``: every stored
        result (ok None for an input without one), grouped by id with the success first,
        then the first read; ``meta_keep_json`` is the metadata row of that id, if any.

        With inputs: in input order, then results whose id is not among the inputs.
        Without: in natural order of custom_id.
        """
        self._index()
        natural = "ORDER BY natural_key(r.custom_id), r.custom_id, r.ok DESC, r.rowid"
        columns = "r.custom_id, NULL, r.ok, r.offset, r.length, NULL, r.variant, r.file"
        # The consumer's exceptions never pass through here: only the store's own are caught.
        with self._faults():
            self.spool.flush()
            if not self.has_inputs:
                yield from self.db.execute(f"SELECT {columns} FROM results r {natural}")
                return
            yield from self.db.execute(
                "SELECT i.custom_id, i.keep, r.ok, r.offset, r.length, "
                "(SELECT m.keep FROM meta m WHERE m.custom_id = i.custom_id), r.variant, r.file FROM inputs i "
                "LEFT JOIN results r ON r.custom_id = i.custom_id ORDER BY i.pos, r.ok DESC, r.rowid")
            yield from self.db.execute(
                f"SELECT {columns} FROM results r WHERE NOT EXISTS "
                f"(SELECT 1 FROM inputs i WHERE i.custom_id = r.custom_id) {natural}")

    def record(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.spool.fileno(), length, offset)
        except OSError as exc:
            raise self._fault(exc) from None


@dataclass
class Duplicates:
    ids: int = 0  # custom_ids read more than once
    success_won: int = 0  # ... where a success replaced a failure
    example: str | None = None


class VariantConflict(Exception):
    """One id answered twice in one run with different generation settings: ``first`` and
    ``second`` are ``(file, variant)`` of the two (``file``: a file number, or a node in ``--compare``)."""

    def __init__(self, custom_id: str, first: tuple, second: tuple, run: int | None = None):
        super().__init__(custom_id)
        self.custom_id, self.first, self.second, self.run = custom_id, first, second, run


def pick(rows: Iterable[tuple], duplicates: Duplicates) -> Iterator[tuple]:
    """Keep the first row of each custom_id group (the success if any, else the first
    read). An empty custom_id is never merged: each such failure stays its own line.
    Rows end with ``(variant, file)``: two variants of one id raise ``VariantConflict``."""
    previous, chosen_ok, counted, seen = None, None, False, None
    for row in rows:
        custom_id, ok, variant = row[0], row[2], row[6]
        if custom_id == previous and custom_id != "":
            if variant is not None:
                if seen is None:
                    seen = (row[7], variant)
                elif variant != seen[1]:
                    raise VariantConflict(custom_id, seen, (row[7], variant))
            if not counted:
                duplicates.ids += 1
                duplicates.example = duplicates.example or custom_id
                counted = True
                if chosen_ok and not ok:
                    duplicates.success_won += 1
            continue
        previous, chosen_ok, counted = custom_id, ok, False
        seen = (row[7], variant) if variant is not None else None
        yield row
