"""The tree's shape: no import circles (type-only and importlib-by-name imports included), the
process packages apart, no function over 100 lines but transcriptions that say so, and a README
whose layout names every file."""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "guestproc", "kvmproc", "qemuproc", "vhostuserproc", "vreplica")
PROCESSES = ("guestproc", "kvmproc", "qemuproc", "vhostuserproc")
MAX_LINES = 100
TRANSCRIPTION = re.compile(r"is this long\s+too")
"""The docstring marker of a function that transcribes a real one of that length."""


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return [p for p in out.splitlines() if (REPO / p).exists()]


def modules() -> dict[str, Path]:
    """Every tracked module of the packages, by dotted name."""
    found: dict[str, Path] = {}
    for rel in tracked(*(f"{p}/*.py" for p in PACKAGES)):
        parts = list(Path(rel).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = REPO / rel
    return found


def module_strings(tree: ast.AST, known: dict[str, Path]) -> Iterator[str]:
    """String constants naming a module: importlib-by-name dispatch (``("vreplica.demo",
    "main")``) counts as an import."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            yield node.value


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in it (functions and ``if
    TYPE_CHECKING:`` blocks included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    out.update(m for m in module_strings(tree, known) if m != name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports_of(name, path, known) for name, path in known.items()}
    # a module's import runs its package's __init__ first: a parent package is a dependency
    # only through what __init__ itself imports, so it adds no edge of its own here
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.mark.timeout(60)
def test_no_import_circles() -> None:
    """No module reaches itself through imports of any kind."""
    assert cycles(graph()) == []


@pytest.mark.timeout(60)
def test_the_cycle_finder_finds_a_circle() -> None:
    """The check itself: a two-module circle and a three-module one are found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.timeout(60)
def test_type_only_and_by_name_imports_count(tmp_path: Path) -> None:
    """An import under ``if TYPE_CHECKING:``, one inside a function and a module named in a
    string all make an edge."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import X\n"
                   "def f():\n    from p.b import y\nTABLE = {'c': ('p.c', 'main')}\n")
    known = {"p.a": src, "p.b": src, "p.c": src, "p.m": src}
    assert imports_of("p.m", src, known) == {"p.a", "p.b", "p.c"}


@pytest.mark.timeout(60)
def test_process_packages_import_only_common() -> None:
    """guestproc, kvmproc, qemuproc and vhostuserproc share only ``common``."""
    crossings = sorted((name, dep) for name, deps in graph().items() for dep in deps
                       if name.split(".")[0] in PROCESSES
                       and dep.split(".")[0] not in ("common", name.split(".")[0]))
    assert crossings == []


def functions(path: Path) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.timeout(60)
def test_no_function_over_100_lines() -> None:
    """A function longer than 100 lines is a transcription of a real one that long, and its
    docstring says so."""
    long = []
    for rel in tracked("*.py"):
        for fn in functions(REPO / rel):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            doc = ast.get_docstring(fn) or ""
            if length > MAX_LINES and not TRANSCRIPTION.search(doc):
                long.append(f"{rel}:{fn.lineno} {fn.name} ({length} lines)")
    assert long == []


def readme_layout() -> str:
    """The code block of the README's ``## Layout`` section."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.S | re.M)
    assert m, "README has no '## Layout' section with a code block"
    return m.group(1)


def layout_names(layout: str) -> set[str]:
    """The paths the layout names. A line is an indent, names separated by ", ", then two
    spaces and what they are; a name ending in / is a folder, and deeper lines are in it."""
    names: set[str] = set()
    folders: list[tuple[int, str]] = []
    for line in layout.splitlines():
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        entry = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        while folders and folders[-1][0] >= depth:
            folders.pop()
        base = "".join(f for _, f in folders)
        for name in entry.split(", "):
            names.add(base + name)
            if name.endswith("/"):
                folders.append((depth, name))
    return names


@pytest.mark.timeout(60)
def test_layout_names_reads_folders_and_lists() -> None:
    """The reader itself: nested folders, a list of names, a description after two spaces."""
    layout = "a/  a folder\n  b.py, c.py  two files\n  d/\n    e.md  deep\nf.md  top\n"
    assert layout_names(layout) == {"a/", "a/b.py", "a/c.py", "a/d/", "a/d/e.md", "f.md"}


@pytest.mark.timeout(60)
def test_readme_is_a_short_map() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.timeout(60)
def test_readme_layout_names_every_file() -> None:
    """Every tracked .py and .md file of the packages, tests and docs appears in the layout,
    and every file the layout names exists."""
    names = layout_names(readme_layout())
    files = tracked(*(f"{p}/*.py" for p in PACKAGES), "tests/*.py", "docs/*.md", "*.md")
    missing = sorted(f for f in files if f not in names and not f.endswith("__init__.py"))
    assert missing == []
    absent = sorted(n for n in names if not (REPO / n).exists())
    assert absent == []
