"""Small helpers shared by the tests: where the project is, and running a script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each root script is a thin file over its package module (where build_parser lives).
SCRIPT_MODULES = {"create_batchinput": "datagen.batchapi.create_batchinput",
                  "batch_utils": "datagen.batchapi.batch_utils",
                  "generate_data_finetuned": "datagen.finetuned.generate_data_finetuned",
                  "reformat_results": "datagen.results.reformat_results"}


def run_script(script: str, *args: str, cwd: str | os.PathLike | None = None,
               env: dict | None = None, timeout: float = 300, input: str | None = None
               ) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts as a user would, with this interpreter."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, input=input)


def read_jsonl(path) -> list:
    import json

    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path, rows) -> Path:
    import json

    path = Path(path)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def files_in(folder) -> list[str]:
    """Every file name in a folder, temporary ones included (for 'no partial output')."""
    return sorted(p.name for p in Path(folder).iterdir())


def copy_files(source: Path, target: Path) -> Path:
    """Copy the plain files of ``source`` (a module-scoped fixture's folder) into ``target``."""
    import shutil

    for path in source.iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)
    return target
