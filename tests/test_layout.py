"""The package's layout keeps the architecture readable: routes are folders, imports go one
way, no module grows past one sitting, and docs/development.md is the one map of it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.util import ROOT

PACKAGE = ROOT / "datagen"
MAX_LINES = 500
STAND_INS = ("datagen.local_batch_server", "datagen.tinymodel", "datagen.demo")
SCRIPTS = ("create_batchinput.py", "batch_utils.py", "generate_data_finetuned.py", "reformat_results.py")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every datagen module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("datagen"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("datagen"))
    return {name for name in found if name in known and name != "datagen"} - {module_name(path)}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_even_through_imports_inside_functions():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_imports_go_one_way():
    edges = graph()

    def reaches(prefix: str, name: str) -> list[str]:
        return sorted(d for d in edges[name] if d == prefix or d.startswith(prefix + "."))

    for name in edges:
        if name.startswith("datagen.common."):  # shared input and files: below every route
            for route in ("batchapi", "finetuned", "results", "cache"):
                assert reaches(f"datagen.{route}", name) == [], name
        if not name.startswith(STAND_INS):  # product code never needs the offline stand-ins
            for stand_in in STAND_INS:
                assert reaches(stand_in, name) == [], name
    # The low-level file module does not reach up to the command line.
    assert "datagen.common.cli" not in edges["datagen.common.jsonl"]
    # The engine-independent run and the engine protocol import no engine.
    for name in ("datagen.finetuned.generation", "datagen.finetuned.engine", "datagen.finetuned.records"):
        assert {"datagen.finetuned.engine_hf", "datagen.finetuned.engine_vllm"} & edges[name] == set(), name


def test_the_root_scripts_are_thin_files_over_the_package():
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        assert len(text.splitlines()) <= 12, script
        assert re.search(r"^from datagen\.\w+\.\w+ import main$", text, re.M), script


def test_development_md_is_the_one_map_of_the_package():
    """Every module is named in the map, and every datagen path the map names exists."""
    text = (ROOT / "docs" / "development.md").read_text()
    layout = text[text.index("## Layout"):]
    named = set(re.findall(r"`(datagen/[\w/]+(?:\.py)?)`", layout))
    for name, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert rel in named or rel.removesuffix(".py") in named, f"{rel} missing from docs/development.md's Layout"
    for shown in named:
        assert (ROOT / shown).exists() or (ROOT / f"{shown}.py").exists(), f"{shown} named but absent"
    # The package's own docstring points to that map instead of keeping a second one.
    assert "docs/development.md" in (PACKAGE / "__init__.py").read_text()
