"""Layers point down (docs/architecture.md): ground core/ <- parts bus/, cluster/ <- collector/,
exporter/ <- supervisor/ <- front mexc/.  Every import of every product module is read,
those inside functions too, so an upward one fails here, not in a reviewer's head."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAY_IMPORT = {  # package -> the project's packages it may import (besides itself)
    "core": set(),
    "bus": {"core"},
    "cluster": {"core"},
    "collector": {"core", "bus"},
    "exporter": {"core", "bus", "cluster"},
    "supervisor": {"core", "bus", "cluster", "collector", "exporter"},
    "mexc": {"core", "bus", "cluster", "collector", "exporter", "supervisor"},
}


def imports(path):
    """(line, top-level package) of every absolute import in a file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_only_point_down(package):
    wrong = []
    for directory, _dirs, files in os.walk(os.path.join(ROOT, package)):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(directory, name)
            for line, imported in imports(path):
                if imported in MAY_IMPORT and imported != package \
                        and imported not in MAY_IMPORT[package]:
                    wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {imported}")
    assert not wrong, "imports running up the layers:\n" + "\n".join(wrong)


def test_the_supervisor_and_its_collectors_load_no_pyarrow():
    """Only the exporter and history read Arrow (they import it when they do): loaded in the
    supervisor, every collector forked from it carried 0.5 MiB more private memory."""
    code = ("import sys, supervisor.arbiter; "
            "print(sorted(m for m in ('pyarrow', 'numpy') if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert found.strip() == "[]"


def test_one_host_never_loads_kazoo():
    """kazoo and cluster/ are imported by the supervisor only when [cluster] host is set."""
    code = ("import sys, supervisor.arbiter, mexc.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kazoo', 'cluster')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
