"""The architecture holds (docs/architecture.md): the layers' dependency rule (import-linter's
contracts in pyproject.toml), no import cycle anywhere in the package (type-only imports included),
a short engine, and a CLI that checks configs without importing torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
from importlinter import cli as importlinter

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold(tmp_path, capsys):
    code = importlinter.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == importlinter.EXIT_STATUS_SUCCESS, capsys.readouterr().out


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # iterative Tarjan: (node, iterator over its imports)
        work = [(v, iter(sorted(graph.find_modules_directly_imported_by(v))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    members = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        members.append(w)
                        if w == node:
                            break
                    if len(members) > 1:
                        found.append(sorted(members))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle_in_the_package():
    graph = grimp.build_graph("framework", "plugins", exclude_type_checking_imports=False)
    assert len(graph.modules) > 100
    assert cycles(graph) == []


def test_the_engine_module_is_the_loop_and_little_else():
    lines = (ROOT / "framework" / "core" / "engine.py").read_text().splitlines()
    assert len(lines) <= 200, f"framework/core/engine.py has {len(lines)} lines (aim: ≤ 200)"


def test_settings_and_the_cli_module_import_without_torch():
    code = ("import sys; import framework.core.settings, framework.entry.cli; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "importing the settings schema or the CLI module imported torch"


def test_docs_link_only_to_files_in_the_repository():
    """Every relative link of the README, docs/ and the model card names a file that exists here,
    and nothing points outside the repository."""
    import re

    pages = [ROOT / "README.md", ROOT / "framework" / "bundled" / "MODEL_CARD.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                broken.append(f"{page.relative_to(ROOT)} → {target}")
        for outside in ("../shared", "ENVIRONMENT.md", "DESIGN.md"):
            if outside in text:
                broken.append(f"{page.relative_to(ROOT)} mentions {outside}")
    assert broken == []
