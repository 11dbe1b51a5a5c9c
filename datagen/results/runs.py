"""Which run a result belongs to: one identity per run, its name, and the runs among files.

A **run** is one model (or one adapter on a base model) answering one input. Records of
different runs are never deduplicated against each other: ``reformat_results.py`` refuses
to merge them, and ``--compare`` gives each run its own column, named by its run name.

``run_key`` is the one definition of a result's run identity:

- **fine-tuned** (a generations record, raw or reformatted): the source, the base model,
  the adapter, the record's ``run`` name and the fingerprint's ``model``, ``adapter`` and
  ``engine`` parts; not its ``generation`` part, which varies per request with the batch
  input's parameters (shards of one run are one run whatever they hold). A file's records
  without a ``run`` name, written before records had one, join the named ones of that file.
  Two runs of one adapter that differ only in generation settings (``--temperature 0.7``
  and ``1.0``) show as a **conflict**: the same ``custom_id`` answered twice with differing
  ``generation`` fingerprints (``variant``), refused with ``generation_conflict``; the same
  record read twice (a glob over a file and its shards) is a duplicate, dropped quietly.
- **OpenAI**: the model as requested (the download's sidecar, ``datagen.batchapi.provenance``; else
  the answer's model) and the batch inputs the sidecar names (``input_digests``; a part of a
  split input also stands for the whole input). Files whose inputs overlap (a download and
  the download of its ``--retry_failed`` batches, parts of one input) are one run; without a
  sidecar a file's run is its model.

The **run name**: the record's ``run`` (``--adapter_path NAME=PATH``'s NAME, ``base``), else
the adapter folder's name, else ``base`` (fine-tuned); the model as requested (OpenAI).
``RunSorter`` collects the identities seen per file and groups them into runs (``runs``);
lines with no identity of their own (an OpenAI error line names no model) join their
file's run, or the run of the output file beside them.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from datagen.batchapi import provenance
from datagen.common.errors import UserError
from datagen.common.jsonl import loads

FINETUNED, OPENAI = "finetuned", "openai"
BASE = "base"  # the run name of a base model alone
_PART = re.compile(r"^(.*)\.part-\d{3,}(\.[^.]*)$")


def adapter_run_name(adapter: Any) -> str:
    """The run name of records without one: the adapter folder's name, else ``base``."""
    if isinstance(adapter, str) and adapter.strip("/"):
        return Path(adapter.rstrip("/")).name
    return BASE


def finetuned_name(obj: dict) -> str:
    run = obj.get("run")
    return run if isinstance(run, str) and run else adapter_run_name(obj.get("adapter"))


def _fingerprint_parts(fingerprint: Any) -> tuple:
    if not isinstance(fingerprint, dict):
        return None, None, None
    return fingerprint.get("model"), fingerprint.get("adapter"), fingerprint.get("engine")


def variant(fingerprint: Any) -> str | None:
    """The fingerprint's ``generation`` part (a short hash): two records of one id in one
    run must have the same (``generation_conflict``); None when there is none."""
    value = fingerprint.get("generation") if isinstance(fingerprint, dict) else None
    return value if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def run_key(source: str, obj: dict, *, roots: frozenset | None = None, requested: str | None = None,
            fingerprint: Any = None) -> tuple:
    """The identity of the run that made ``obj`` (see the module docstring), as a tuple
    ``(source, run, model, adapter, fingerprint parts, roots)``.

    Fine-tuned: ``obj`` is a generations record (``fingerprint`` defaults to its own) or a
    reformatted record (pass the fingerprint from its details). OpenAI: ``requested`` is the
    model the sidecar names, else ``obj["model"]`` (the answer's); ``roots`` the sidecar's inputs.
    """
    if source == OPENAI:
        return OPENAI, requested or _text(obj.get("run")) or _text(obj.get("model")), None, None, None, roots
    parts = _fingerprint_parts(obj.get("fingerprint") if fingerprint is None else fingerprint)
    return FINETUNED, _text(obj.get("run")), _text(obj.get("model")), _text(obj.get("adapter")), parts, None


def key_name(key: tuple) -> str:
    if key[0] == OPENAI:
        return key[1] or "(no model)"
    return key[1] or adapter_run_name(key[3])


class Origins:
    """The OpenAI download sidecars of some results files: the requested model and the
    input roots of each (the digests of ``provenance.input_digests``, and ``parts-of:NAME``
    for a batch made from a part ``NAME.part-NNN.jsonl`` of a split input)."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[str | None, frozenset | None]] = {}

    def of(self, path: Path) -> tuple[str | None, frozenset | None]:
        sidecar_file = provenance.sidecar_path(path).resolve()
        if sidecar_file not in self._cache:
            sidecar = provenance.read_sidecar(path)
            if sidecar is None:
                self._cache[sidecar_file] = (None, None)
            else:
                roots = set(provenance.input_digests(sidecar))
                models = []
                for batch in sidecar["batches"]:
                    match = _PART.match(batch.get("source_file") or "")
                    if match and not batch.get("retry_of"):
                        roots.add(f"parts-of:{match.group(1)}{match.group(2)}")
                    if isinstance(batch.get("model"), str) and batch["model"] not in models:
                        models.append(batch["model"])
                self._cache[sidecar_file] = (models[0] if len(models) == 1 else None, frozenset(roots) or None)
        return self._cache[sidecar_file]


class _Groups:
    """Disjoint sets of node numbers (union-find); ``join`` puts a node in the group of the
    first node that had ``token``."""

    def __init__(self, size: int):
        self.parent = list(range(size))
        self.first: dict[tuple, int] = {}

    def find(self, n: int) -> int:
        parent = self.parent
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)

    def join(self, node: int, token: tuple) -> None:
        self.union(node, self.first.setdefault(token, node))


def _name_run(run: "FoundRun") -> None:
    """A run's source and name: the first run name of its records (fine-tuned), else its
    first key's name; a run of failures only, that names no model: its first file's name."""
    if run.keys:
        run.source = run.keys[0][0]
        named = [k[1] for k in run.keys if k[1]]
        run.name = named[0] if named and run.source == FINETUNED else key_name(run.keys[0])
    else:
        run.name = run.files[0].name


@dataclass
class FoundRun:
    """One run among the files read: its name, its files (in reading order) and keys."""

    name: str
    source: str
    files: list[Path] = field(default_factory=list)
    keys: list[tuple] = field(default_factory=list)

    def name_with_files(self, limit: int = 3) -> str:
        """``NAME (file, file, file +N more)``, for messages."""
        shown = ", ".join(str(p) for p in self.files[:limit])
        more = f" +{len(self.files) - limit} more" if len(self.files) > limit else ""
        return f"{self.name} ({shown}{more})"


class RunSorter:
    """The run identities seen in each file; ``runs()`` groups them into runs.

    ``note(file_number, key)`` returns a node number for the line (cheap per line: one
    dict lookup); ``note(file_number, None)`` a node for lines with no identity of their
    own. ``runs()`` returns the runs and ``run_of``: node number -> index of its run.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self._nodes: dict[tuple, int] = {}  # (file number, key) -> node
        self._node_info: list[tuple[int, tuple | None]] = []
        self.run_of: list[int] = []
        self.ambiguous: list[Path] = []  # files whose lines without identity could be of several runs

    def note(self, file_number: int, key: tuple | None) -> int:
        node = self._nodes.get((file_number, key))
        if node is None:
            node = self._nodes[(file_number, key)] = len(self._node_info)
            self._node_info.append((file_number, key))
        return node

    def file_of(self, node: int) -> Path:
        return self.files[self._node_info[node][0]]

    def runs(self) -> list[FoundRun]:
        """The runs among the nodes noted (and ``run_of``): nodes joined into runs, then named."""
        groups = _Groups(len(self._node_info))
        known = [(n, f, k) for n, (f, k) in enumerate(self._node_info) if k is not None]
        self._join_known(known, groups)
        for node, (file_number, key) in enumerate(self._node_info):
            if key is None:
                self._attach(node, file_number, known, groups)
        runs = self._collect(groups.find)
        for run in runs:
            _name_run(run)
        return runs

    @staticmethod
    def _join_known(known: list[tuple[int, int, tuple]], groups: _Groups) -> None:
        """Join the nodes with an identity: the same identity in two files; fine-tuned records
        without a run name and the named ones of their file; OpenAI files whose inputs
        overlap; an OpenAI file without a sidecar and the one run of its model, if one."""
        unnamed: list[tuple[int, tuple]] = []
        for node, file_number, key in known:
            groups.join(node, ("key", key))
            if key[0] == FINETUNED:  # records without a name join the named ones of their file
                base = (file_number, *key[2:5])
                if key[1] is None:
                    unnamed.append((node, base))
                else:
                    groups.first.setdefault(("file-named", *base), node)
            elif key[5]:  # overlapping inputs: a retry's download, parts of one input
                for token in key[5]:
                    groups.join(node, ("input", key[1], token))
        for node, base in unnamed:
            groups.join(node, ("file-named", *base))
        models: dict[str, set[int]] = {}
        for node, _, key in known:
            if key[0] == OPENAI and key[5] is not None:
                models.setdefault(key[1], set()).add(node)
        for node, _, key in known:  # no sidecar: the one run of that model, if there is one
            if key[0] == OPENAI and key[5] is None:
                others = {groups.find(n) for n in models.get(key[1], ())}
                if len(others) == 1:
                    groups.union(node, others.pop())

    def _collect(self, find) -> list[FoundRun]:
        """One FoundRun per group of nodes, with its files and keys; sets ``run_of``."""
        roots: dict[int, int] = {}
        runs: list[FoundRun] = []
        self.run_of = []
        for node, (file_number, key) in enumerate(self._node_info):
            root = find(node)
            if root not in roots:
                roots[root] = len(runs)
                runs.append(FoundRun("", OPENAI))
            run = runs[roots[root]]
            self.run_of.append(roots[root])
            if self.files[file_number] not in run.files:
                run.files.append(self.files[file_number])
            if key is not None:
                run.keys.append(key)
        return runs

    def _attach(self, node: int, file_number: int, known: list, groups: _Groups) -> None:
        """Lines with no identity: their file's run, else the run of the output beside them
        (OUT.errors.jsonl, OUT.failed.jsonl), else the only run there is."""
        path = self.files[file_number]
        own = {groups.find(n) for n, f, _ in known if f == file_number}
        if not own:
            name = path.name
            for suffix in (".errors.jsonl", ".failed.jsonl"):
                if name.endswith(suffix):
                    stem = name[:-len(suffix)]
                    partners = [i for i, p in enumerate(self.files) if p.parent == path.parent and
                                (p.name == stem or (suffix == ".failed.jsonl" and p.stem == stem))]
                    own = {groups.find(n) for n, f, _ in known if f in partners}
        if not own:
            own = {groups.find(n) for n, _, _ in known}
        if len(own) > 1:
            self.ambiguous.append(path)
        if own:
            groups.union(node, min(own))

    def check_unambiguous(self) -> None:
        if self.ambiguous:
            raise UserError(f"{self.ambiguous[0]}: failed lines that name no model, among results of several runs; "
                            "cannot tell which run they belong to: give each run's files on their own")


def answered_inputs(keys: Iterable[tuple]) -> set:
    """The batch inputs that OpenAI run keys answer, per model (as ``RunSorter`` joins them):
    two runs sharing one are one run (a download and its ``--retry_failed`` download)."""
    return {(key[1], token) for key in keys if key[0] == OPENAI and key[5] for token in key[5]}


def names_with_files(runs: list[FoundRun]) -> str:
    return "; ".join(run.name_with_files() for run in runs)


def record_details(obj: dict) -> dict:
    """A reformatted record's ``details`` (JSON text in the files) as a dict; {} when it has none."""
    details = obj.get("details")
    if isinstance(details, str):
        try:
            details = loads(details)
        except ValueError:
            return {}
    return details if isinstance(details, dict) else {}


def record_generation(obj: dict) -> tuple[Any, str | None, Any]:
    """``(id, variant, generation)`` of a generations record, raw or reformatted (its details)."""
    if "custom_id" in obj:
        return obj.get("custom_id"), variant(obj.get("fingerprint")), obj.get("generation")
    details = record_details(obj)
    return obj.get("id"), variant(details.get("fingerprint")), details.get("generation")


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def generation_conflict(custom_id: str, name: str, first: tuple[Path, Any], second: tuple[Path, Any],
                        context: str) -> UserError:
    """The refusal for two answers of one id in one run, made with different generation
    settings (``first``/``second``: ``(file, generation dict)``): two runs that differ
    only in those, named by the user (``--compare NAME=PATH``)."""
    (path_a, gen_a), (path_b, gen_b) = first, second
    gen_a, gen_b = (g if isinstance(g, dict) else {} for g in (gen_a, gen_b))
    keys = [k for k in dict.fromkeys([*gen_a, *gen_b]) if gen_a.get(k) != gen_b.get(k)]
    differs = ", ".join(f"{k} {_json_text(gen_a.get(k))} vs {_json_text(gen_b.get(k))}" for k in keys[:3]) or \
        "their generation fingerprints"
    if Path(path_a).resolve() == Path(path_b).resolve():
        return UserError(f"{context}{path_a} answers {custom_id!r} twice with different generation settings "
                         f"({differs}): two runs of {name!r} in one file; keep one run per file")
    names = [re.sub(r"[^A-Za-z0-9._-]", "", _json_text(g.get(keys[0])) if keys else "") for g in (gen_a, gen_b)]
    if not all(names) or names[0] == names[1]:
        names = ["1", "2"]
    hint = " ".join(f"{name}_{n}={shlex.quote(str(p))}" for n, p in zip(names, (path_a, path_b)))
    return UserError(f"{context}{path_a} and {path_b} both answer {custom_id!r} for run {name!r}, with different "
                     f"generation settings ({differs}): they are two runs, never merged; put them side by side "
                     f"with --compare {hint} (or reformat each on its own)")


def generation_of(lines: Iterable[dict], custom_id: str, wanted: str) -> Any:
    """The ``generation`` dict of the record of ``custom_id`` with variant ``wanted`` in ``lines``."""
    for obj in lines:
        found_id, found_variant, generation = record_generation(obj)
        if found_id == custom_id and found_variant == wanted:
            return generation
    return None
