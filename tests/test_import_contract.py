"""The import contract (issue 19): sculptor/ is the only layer the gateway and the worker both import.

- no module under service/ imports worker, and none under worker/ imports service;
- no module under sculptor/ imports either;
- no two modules of the three packages import each other, directly or through others (no cycles).

The first two are import-linter's layers contract (pyproject.toml, `[tool.importlinter]`), run here. All
three are also checked on an import graph read from the source with `ast` (importing nothing), which adds
what import-linter does not check: cycles between modules (its `acyclic_siblings` contract works on
packages, where worker.training and worker.osft, or service.api and service.generation, use each other
with no module cycle), and imports by literal name. In that graph every import counts: at module level,
inside functions and classes, under `if TYPE_CHECKING:` or in a `try:`, and `importlib.import_module` /
`__import__` with a literal name. `from a.b import c` imports the module a.b.c where there is one, else a.b.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sculptor", "service", "worker")
# What each package may import besides itself.
ALLOWED = {"sculptor": set(), "service": {"sculptor"}, "worker": {"sculptor"}}


def find_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under the packages."""
    found = {}
    for package in packages:
        if not (root / package).is_dir():
            continue
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything the source imports, wherever the import statement is."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                yield (base if alias.name == "*" else f"{base}.{alias.name}"), node.lineno
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node.args[0].value, node.lineno


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module `name` imports: its longest prefix that is one of ours (None: another package's)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in known:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, dict[str, int]]:
    """module -> {module it imports: first line importing it}, over our modules only."""
    known = find_modules(root, packages)
    graph: dict[str, dict[str, int]] = {}
    for module, path in known.items():
        edges = graph.setdefault(module, {})
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in _imported_names(tree, module, path.name == "__init__.py"):
            target = _resolve(name, known)
            if target and target != module:
                edges.setdefault(target, line)
    return graph


def layer_violations(graph: dict[str, dict[str, int]], root: Path = ROOT) -> list[str]:
    known = find_modules(root)
    found = []
    for module, edges in sorted(graph.items()):
        source = module.split(".")[0]
        for target, line in sorted(edges.items()):
            imported = target.split(".")[0]
            if imported != source and imported not in ALLOWED.get(source, set()):
                found.append(f"{known[module].relative_to(root)}:{line} imports {target} "
                             f"({source}/ may import {sorted(ALLOWED.get(source, set())) or 'no other package'})")
    return found


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_one_cycle(graph, set(c)) for c in sorted(components)]


def _one_cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """The shortest path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {child: [start, child] for child in graph[start] if child in component}
    frontier = sorted(paths)
    while start not in paths:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child in component and child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    return paths[start]


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


# ---------- the contract, on this repository ----------

def test_import_linter_contract_is_kept():
    """`lint-imports` on pyproject.toml's contract (no cache: nothing is written into the checkout)."""
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (
        "import-linter: the layers contract is broken, or import-linter is missing (`make venv` installs it):\n"
        + run.stdout[-4000:] + run.stderr[-2000:])
    assert "1 kept, 0 broken" in run.stdout


def test_service_and_worker_never_import_each_other_and_sculptor_imports_neither():
    violations = layer_violations(import_graph())
    assert not violations, "imports across the layers:\n" + "\n".join(violations)


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)


def test_every_module_is_read():
    graph = import_graph()
    assert {"service.app", "worker.pipeline", "sculptor.train_queue", "worker.osft.registry"} <= set(graph)
    assert "sculptor.train_queue" in graph["service.api.routes.tasks"]  # the edges are there to check


# ---------- the check itself, on a made-up tree ----------

def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_sees_imports_in_functions_relative_and_by_name(tmp_path):
    write(tmp_path, {
        "sculptor/__init__.py": "",
        "sculptor/shared.py": "def f():\n    from worker.jobs import run\n",
        "service/__init__.py": "",
        "service/app.py": "import importlib\n\ndef g():\n    return importlib.import_module('worker.jobs')\n",
        "service/ok.py": "from sculptor import shared\nfrom . import app\n",
        "worker/__init__.py": "",
        "worker/jobs.py": "try:\n    import service.app\nexcept ImportError:\n    pass\nfrom .tools import x\n",
        "worker/tools.py": "x = 1\n",
    })
    graph = import_graph(tmp_path)
    assert graph["service.ok"] == {"sculptor.shared": 1, "service.app": 2}
    assert graph["worker.jobs"] == {"service.app": 2, "worker.tools": 5}
    assert layer_violations(graph, tmp_path) == [
        "sculptor/shared.py:2 imports worker.jobs (sculptor/ may import no other package)",
        "service/app.py:4 imports worker.jobs (service/ may import ['sculptor'])",
        "worker/jobs.py:2 imports service.app (worker/ may import ['sculptor'])",
    ]


def test_the_check_finds_cycles_through_function_level_imports(tmp_path):
    write(tmp_path, {
        "worker/__init__.py": "",
        "worker/a.py": "from worker import b\n",
        "worker/b.py": "def late():\n    from worker.c import y\n",
        "worker/c.py": "import worker.a\ny = 1\n",
        "worker/d.py": "from worker import a, b, c\n",  # imports into the cycle, but is not on it
    })
    graph = import_graph(tmp_path, packages=("worker",))
    assert cycles(graph) == [["worker.a", "worker.b", "worker.c", "worker.a"]]
    assert describe(cycles(graph)[0], graph) == ("worker.a (line 1) -> worker.b (line 2) -> worker.c (line 1) "
                                                 "-> worker.a")
