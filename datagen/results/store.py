"""The on-disk store of a reformat run: results and original requests in a temporary SQLite database.

``ResultStore`` appends each result's record to a spool file and indexes it in SQLite under
``$TMPDIR``, beside the original requests and their kept fields, so that shuffled results
can be put back in the input order (or the natural order of their ids, ``natural_key``),
deduplicated (``pick``), joined to their metadata and checked for missing ids with flat
memory. ``CompareStore`` adds the table of ``--compare``: every run's cells.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator

from datagen.common.cli import describe_os_error, held_signals
from datagen.common.errors import UserError


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

    # A throw-away database: no journal, no syncing, one connection.
    SCHEMA = """
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA locking_mode = EXCLUSIVE;
        PRAGMA cache_size = -32768; PRAGMA temp_store = FILE;
        CREATE TABLE results (custom_id TEXT NOT NULL, ok INTEGER NOT NULL, offset INTEGER NOT NULL,
                              length INTEGER NOT NULL, file INTEGER, variant TEXT, asked TEXT);
        CREATE TABLE inputs (pos INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, src TEXT NOT NULL, keep BLOB,
                             asked TEXT);
        CREATE TABLE meta (pos INTEGER PRIMARY KEY, custom_id TEXT NOT NULL, src TEXT NOT NULL, keep BLOB);
    """

    def __init__(self, tmp_dir: str | None = None):
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
                self.db.executescript(self.SCHEMA)
        except BaseException:
            self.close()
            raise

    def _fault(self, exc: Exception) -> UserError:
        """A fault of the temporary folder (SQLite or OS) as one line naming it."""
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
        """Insert ``rows`` (streamed: executemany takes them one by one) in one transaction."""
        # Only SQLite's errors are the folder's: ``rows`` reads the user's files.
        try:
            self.db.execute("BEGIN")
            count = self.db.executemany(sql, rows).rowcount
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
        (``variant``: the generation fingerprint, ``datagen.results.runs.variant``; ``asked``: a
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


class CompareStore(ResultStore):
    """A ResultStore with one more table: every run's cells (its best result per id is
    picked by rank when reading)."""

    ANSWERS = ("cells", "node")  # what answers say they asked is checked here (``asked_elsewhere``)

    def __init__(self, tmp_dir: str | None = None):
        super().__init__(tmp_dir)
        try:
            with self._faults():
                self.db.execute("CREATE TABLE cells (custom_id TEXT NOT NULL, rank INTEGER NOT NULL, "
                                "offset INTEGER NOT NULL, length INTEGER NOT NULL, variant TEXT, "
                                "node INTEGER NOT NULL, run INTEGER, asked TEXT)")
        except BaseException:
            self.close()
            raise

    def add_cells(self, rows: Iterable[tuple[str, int, bytes, str | None, int, str | None]]) -> int:
        """``(custom_id, rank, cell_json, variant, node, asked)`` rows; ``node`` becomes a run in
        ``set_runs``; ``asked``: what a fine-tuned record says it asked (``requests.asked_of``)."""
        return self._insert("INSERT INTO cells (custom_id, rank, offset, length, variant, node, asked) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", self._spooled(rows))

    def set_runs(self, run_of: list[int]) -> None:
        """Every cell's node (a run identity) into the number of its run."""
        with self._faults():
            self.db.execute("CREATE TABLE runmap (node INTEGER PRIMARY KEY, run INTEGER NOT NULL)")
            self.db.executemany("INSERT INTO runmap VALUES (?, ?)", enumerate(run_of))
            self.db.execute("UPDATE cells SET run = (SELECT m.run FROM runmap m WHERE m.node = cells.node)")

    def strays(self, limit: int = 3) -> dict[int, tuple[int, list[str]]]:
        """Per run: how many of its ids the requests do not have, and the first few."""
        self._index()
        found: dict[int, tuple[int, list[str]]] = {}
        with self._faults():
            rows = self.db.execute(
                "SELECT run, custom_id FROM cells c WHERE NOT EXISTS (SELECT 1 FROM inputs i WHERE "
                "i.custom_id = c.custom_id) GROUP BY run, custom_id ORDER BY run, MIN(rowid)").fetchall()
        for run, custom_id in rows:
            count, ids = found.get(run, (0, []))
            found[run] = (count + 1, ids + [custom_id] if len(ids) < limit else ids)
        return found

    def table_rows(self) -> Iterator[tuple]:
        """``(key, custom_id, keep, meta, run, rank, offset, length, variant, node)`` grouped by request
        (key), each run's best cell first (ok, then failed, then missing; then first read).
        With requests, only their ids; without, every id of every run."""
        with self._faults():
            self.db.execute("CREATE INDEX cells_by_id ON cells (custom_id, run, rank DESC)")
        self._index()
        lookups = "(SELECT m.keep FROM meta m WHERE m.custom_id = {0} ORDER BY m.pos LIMIT 1)"
        cells = "c.run, c.rank, c.offset, c.length, c.variant, c.node"
        natural = "ORDER BY natural_key(c.custom_id), c.custom_id, c.run, c.rank DESC, c.rowid"
        with self._faults():
            self.spool.flush()
            if self.has_inputs:  # ids the requests do not have stay out (counted as strays)
                yield from self.db.execute(
                    f"SELECT i.pos, i.custom_id, i.keep, {lookups.format('i.custom_id')}, {cells} FROM inputs i "
                    "LEFT JOIN cells c ON c.custom_id = i.custom_id ORDER BY i.pos, c.run, c.rank DESC, c.rowid")
                return
            yield from self.db.execute(
                f"SELECT c.custom_id, c.custom_id, NULL, {lookups.format('c.custom_id')}, {cells} FROM cells c "
                "WHERE NOT EXISTS (SELECT 1 FROM inputs i WHERE i.custom_id = c.custom_id) " + natural)


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
    for custom_id, group in groupby(rows, key=itemgetter(0)):
        if custom_id == "":
            yield from group
            continue
        chosen = next(group)
        yield chosen
        seen = (chosen[7], chosen[6]) if chosen[6] is not None else None
        for k, row in enumerate(group):
            variant = row[6]
            if variant is not None:
                if seen is None:
                    seen = (row[7], variant)
                elif variant != seen[1]:
                    raise VariantConflict(custom_id, seen, (row[7], variant))
            if k == 0:
                duplicates.ids += 1
                duplicates.example = duplicates.example or custom_id
                duplicates.success_won += bool(chosen[2] and not row[2])
