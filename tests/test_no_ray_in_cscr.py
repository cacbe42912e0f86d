"""cscr/ holds the algorithms and never imports ray (STYLE.md rule 1)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CSCR = Path(__file__).resolve().parents[1] / "cscr"


def _ray_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "ray" or a.name.startswith("ray.")]
        elif isinstance(node, ast.ImportFrom) and node.module and (
            node.module == "ray" or node.module.startswith("ray.")
        ):
            found.append(node.module)
    return found


def test_no_source_file_in_cscr_imports_ray():
    files = sorted(CSCR.rglob("*.py"))
    assert len(files) > 5
    offenders = {str(p.relative_to(CSCR)): _ray_imports(p) for p in files if _ray_imports(p)}
    assert offenders == {}


def test_the_scanner_sees_a_ray_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ray import train\n    import ray.data as d\n")
    assert sorted(_ray_imports(bad)) == ["ray", "ray.data"]


def test_importing_every_cscr_module_leaves_ray_unloaded():
    code = (
        "import importlib, pkgutil, sys, cscr\n"
        "for m in pkgutil.walk_packages(cscr.__path__, 'cscr.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
