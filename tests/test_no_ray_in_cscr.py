"""The algorithm layer (every module whose file lives in the repository's cscr/ folder) imports
neither ray nor the application (cscr.cli, cscr.jobs, cscr.serve: the folders cli/, jobs/,
serve/ mapped under the cscr namespace), and its modules import each other without circles
(STYLE.md rule 1; issue 9). The wheel installs the application under cscr only: no top-level
``jobs``, ``serve`` or ``cli`` package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSCR = ROOT / "cscr"
FORBIDDEN = ("ray", "cscr.cli", "cscr.jobs", "cscr.serve")


def _module_name(path: Path, root: Path = CSCR) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(path: Path, root: Path = CSCR) -> list[tuple[str, list[str]]]:
    """(module, names) of every import anywhere in the file (module level, in functions, in
    try/except), relative imports resolved; names is [] for ``import module``. Imports under
    ``if TYPE_CHECKING:`` are skipped (they never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names if a.name != "*"]))
    return found


def _imports(path: Path, root: Path = CSCR) -> list[str]:
    """Every module (or module.attribute, for ``from module import attribute``) a file names."""
    out: list[str] = []
    for module, names in _import_statements(path, root):
        out += [module] + [f"{module}.{n}" for n in names]
    return out


def _forbidden(names: list[str]) -> list[str]:
    return sorted({n for n in names for f in FORBIDDEN if n == f or n.startswith(f + ".")})


def _files() -> list[Path]:
    files = sorted(p for p in CSCR.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 5
    return files


def test_no_module_of_the_algorithm_layer_imports_ray_or_the_application():
    offenders = {str(p.relative_to(ROOT)): _forbidden(_imports(p)) for p in _files()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scanner_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "cscr" / "sub"
    pkg.mkdir(parents=True)
    bad = pkg / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cscr.jobs.hidden\n"
                   "def f():\n    from ray import train\n    import ray.data as d\n"
                   "    from cscr.serve.app import x\n    from ..cli import main\n"
                   "try:\n    import cscr.jobs.cluster\nexcept ImportError:\n    pass\n")
    found = _forbidden(_imports(bad, tmp_path / "cscr"))
    assert found == ["cscr.cli", "cscr.cli.main", "cscr.jobs.cluster", "cscr.serve.app", "cscr.serve.app.x",
                     "ray", "ray.data", "ray.train"]


def test_importing_every_algorithm_module_loads_neither_ray_nor_the_application():
    code = (
        "import importlib, pkgutil, sys, cscr\n"
        f"folder = {str(CSCR)!r}\n"
        "names = [m.name for m in pkgutil.walk_packages([folder], 'cscr.')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        f"print(len(names), sorted(m for m in sys.modules if m.split('.')[0] == 'ray' or "
        f"any(m == f or m.startswith(f + '.') for f in {FORBIDDEN[1:]!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    count, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) > 20 and loaded == "[]"


def _graph(files: list[Path], root: Path = CSCR) -> dict[str, set[str]]:
    """module -> the modules of the folder it imports: ``import a.b`` and ``from a.b import c``
    give a.b, unless a.b.c is itself a module (then a.b.c); a name that is no module of the
    folder gives the nearest enclosing one that is."""
    modules = {_module_name(p, root): p for p in files}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for module, names in _import_statements(p, root):
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            targets = subs if subs and len(subs) == len(names) else [owner(module), *subs]
            graph[m] |= {t for t in targets if t and t != m}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_circles_in_the_algorithm_layer():
    graph = _graph(_files())
    assert len(graph) > 20 and sum(len(v) for v in graph.values()) > 20
    assert _cycles(graph) == []


def test_the_circle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "cscr"
    (pkg / "routers").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routers" / "__init__.py").write_text("")
    (pkg / "train.py").write_text("from cscr import trained\n")
    (pkg / "trained.py").write_text("def load():\n    from cscr.routers.cscr import Router\n")
    (pkg / "routers" / "cscr.py").write_text("from .. import train\n")
    (pkg / "alone.py").write_text("import cscr.train\n")
    files = sorted(pkg.rglob("*.py"))
    assert _cycles(_graph(files, pkg)) == [["cscr.routers.cscr", "cscr.train", "cscr.trained"]]


def test_the_wheel_has_no_top_level_jobs_serve_or_cli_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("cscr", "cli", "jobs", "serve"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("cscr-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"cscr"}
    for module in ("cscr/cli/__init__.py", "cscr/cli/commands/fingerprint.py", "cscr/jobs/cluster.py",
                   "cscr/jobs/fingerprint.py", "cscr/serve/app.py", "cscr/routers/base.py"):
        assert module in names
