"""The results files a command line names: ``--input_file`` patterns and ``--compare`` runs.

``expand_inputs`` turns paths and globs into files, in the order given: a missing
``generations.jsonl`` whose shards ``generations.shard-*-of-*.jsonl`` exist stands for
them, an OpenAI output file brings its ``.errors.jsonl`` along, and a file named twice is
read once (``check_shards`` warns when shards of a SLURM array are left out).

``expand_runs`` does the same for each ``--compare`` argument (``NAME=PATH`` or ``PATH``,
a ``Spec``): a generations file that does not exist also stands for its adapters' files
(``OUT.NAME.jsonl``, ``OUT.base.jsonl``, each maybe sharded or reformatted to
``OUT.NAME.parquet``), and a reformatted file brings its ``.failed.jsonl`` along.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from datagen.common.errors import UserError

log = logging.getLogger("datagen")

_SHARD = re.compile(r"\.shard-(\d+)-of-(\d+)$")
_NAME = re.compile(r"^[^=/\\*?\[\]]+$")


# --- --input_file ---------------------------------------------------------------------------


def _matches(pattern: str, flag: str) -> list[Path]:
    """The files one path or glob names (a missing file: its shards)."""
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        raise UserError(f"{flag} {pattern} is a directory; name the results files or a glob")
    if glob.has_magic(pattern):
        matches = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        if not matches:
            raise UserError(f"{flag} {pattern} matches no file; check the pattern")
        return matches
    matches = sorted(path.parent.glob(f"{glob.escape(path.stem)}.shard-*-of-*{path.suffix}"))
    if not matches:
        siblings = sorted(p.name for p in path.parent.glob(f"{glob.escape(path.stem)}.*{path.suffix}")
                          if not p.stem.endswith((".failed", ".errors")))
        hint = (f" (one file per adapter: {', '.join(siblings[:3])}: reformat each one, or give "
                f"{pattern} to --compare)" if siblings and flag == "--input_file" else "")
        raise UserError(f"{flag} {pattern}: no such file{hint}; check the path")
    log.info("%s does not exist: reading its %d shards %s ...", path, len(matches), matches[0].name)
    return matches


def _with_error_files(paths: Iterable[Path]) -> Iterable[Path]:
    """Each file, then the ``.errors.jsonl`` beside it when there is one."""
    for path in paths:
        yield path
        errors = path.with_name(path.name + ".errors.jsonl")
        if not path.name.endswith(".errors.jsonl") and errors.is_file():
            yield errors


def expand_inputs(patterns: Iterable[str], flag: str = "--input_file") -> list[Path]:
    """Paths and globs into files, in the order given (a glob's matches sorted); see the
    module docstring."""
    patterns = list(patterns)
    unique: dict[Path, Path] = {}  # the same file named twice is read once
    for pattern in patterns:
        for path in _with_error_files(_matches(pattern, flag)):
            unique.setdefault(path.resolve(), path)
    given = {Path(p).resolve() for p in patterns}
    for key, path in unique.items():
        if path.name.endswith(".errors.jsonl") and key not in given:
            log.info("also reading %s, the error file beside the output", path)
    found = list(unique.values())
    check_shards(found)
    return found


def check_shards(paths: list[Path]) -> None:
    """Warn when some shards of a SLURM array are not among the inputs."""
    groups: dict[tuple[str, int], set[int]] = {}
    for path in paths:
        match = _SHARD.search(path.stem)
        if match:
            key = (str(path.parent / (path.stem[:match.start()] + path.suffix)), int(match.group(2)))
            groups.setdefault(key, set()).add(int(match.group(1)))
    for (stem, total), got in groups.items():
        if len(got) < total:
            log.warning("only %d of %d shards of %s are given; the others' requests will be missing",
                        len(got), total, stem)


# --- --compare ------------------------------------------------------------------------------


@dataclass
class Spec:
    """One --compare argument: ``NAME=PATH`` or ``PATH`` (a file, a glob, or a generations
    file that stands for its shards or its adapters' files), and the files it names."""

    text: str
    name: str | None
    paths: list[Path]


def _with_failed_files(paths: list[Path]) -> list[Path]:
    """A reformatted file brings its OUT.failed.jsonl along (as an output its .errors.jsonl)."""
    out = []
    for path in paths:
        out.append(path)
        failed = path.with_name(path.stem + ".failed.jsonl")
        if not path.stem.endswith(".failed") and failed.is_file() and failed not in paths:
            out.append(failed)
    return list(dict.fromkeys(out))


def _adapter_files(path: Path) -> list[Path]:
    """The files a missing ``OUT.jsonl`` stands for: its adapters' ``OUT.NAME.jsonl`` (or
    reformatted ``OUT.NAME.parquet``), each maybe sharded; not its side files."""
    return [match for match in sorted(path.parent.glob(f"{glob.escape(path.stem)}.*"))
            if match.suffix in (path.suffix, ".parquet") and not match.stem.endswith((".failed", ".errors"))
            and not match.name.endswith(".errors.jsonl")]


def _split_name(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a path that holds '=' itself stays a path."""
    name, sep, rest = text.partition("=")
    if sep and not name and rest and not Path(text).exists():
        raise UserError(f"--compare {text}: the NAME before '=' is empty; give NAME=PATH, or PATH alone to "
                        "name the run from its records")
    if sep and rest and _NAME.match(name) and not Path(text).exists():
        return name, rest
    return None, text


def _check_given_once(specs: list[Spec]) -> None:
    """No CSV table among the files, and no file in two arguments (or twice in one)."""
    seen: dict[Path, Spec] = {}
    for spec in specs:
        for file in spec.paths:
            if file.suffix.lower() in (".csv", ".tsv"):
                raise UserError(f"--compare {file}: a CSV table has lost the types and the samples; give "
                                "the run's JSONL or Parquet output, or its raw results")
            other = seen.setdefault(file.resolve(), spec)
            if other is not spec:
                given = f"{file} is given twice ({other.text} and {spec.text})" if other.text != spec.text \
                    else f"{spec.text} is given twice"
                raise UserError(f"--compare: {given}; give each run once")


def expand_runs(patterns: Iterable[str]) -> list[Spec]:
    """Each ``--compare`` argument into its files (see the module docstring)."""
    specs: list[Spec] = []
    for text in patterns:
        name, pattern = _split_name(text)
        path = Path(pattern)
        files = [] if path.exists() or glob.has_magic(pattern) else _adapter_files(path)
        if files:  # its shards, or its adapters' files (each maybe sharded)
            log.info("%s does not exist: reading its %d files %s", path, len(files), ", ".join(f.name for f in files))
            paths = expand_inputs([str(f) for f in files], "--compare")
        else:
            paths = expand_inputs([pattern], "--compare")
        specs.append(Spec(text, name, _with_failed_files(paths)))
    _check_given_once(specs)
    return specs
