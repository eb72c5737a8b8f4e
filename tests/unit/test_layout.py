"""The code's layout, as the design keeps it: the core never reaches up to its callers, Ray Tune
code lives in tune/, one place builds a TorchTrainer, and no module or function outgrows a reading."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "jobs", "tune", "serve")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def modules(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def imported_names(tree: ast.AST) -> set[str]:
    """Every module a file imports: import statements anywhere (inside functions too), and the
    string given to importlib.import_module / __import__."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def test_the_core_never_imports_jobs_tune_or_serve():
    offenders = []
    for path in modules("cluster"):
        for name in imported_names(ast.parse(path.read_text())):
            if name.split(".")[0] in ("jobs", "tune", "serve"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert offenders == []


def test_the_scan_sees_an_import_hidden_in_a_string():
    tree = ast.parse("import importlib\ndef f():\n    return importlib.import_module('serve.cli')\n")
    assert "serve.cli" in imported_names(tree)


def test_ray_tune_is_imported_only_under_tune():
    users = []
    for path in modules(*PACKAGES):
        names = imported_names(ast.parse(path.read_text()))
        if any(n == "ray.tune" or n.startswith("ray.tune.") for n in names):
            users.append(path.relative_to(REPO).parts[0])
    assert users and set(users) == {"tune"}


def test_one_place_builds_a_torch_trainer():
    builders = []
    for path in sorted(REPO.rglob("*.py")):
        if any(part in (".venv", ".git", "tests") for part in path.relative_to(REPO).parts):
            continue
        if re.search(r"\bTorchTrainer\(", path.read_text()):
            builders.append(str(path.relative_to(REPO)))
    assert builders == ["cluster/train/launcher.py"]


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_and_functions_stay_small(package):
    too_big = []
    for path in modules(package):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert too_big == []


HISTORY = re.compile(r"\b(used\s+to\s+(?:be|arrive|take|run|print|fail|start|have)|an\s+earlier\s+version|no\s+longer"
                     r"|(?:19|20)\d\d-\d\d-\d\d|\w+ session of)\b", re.IGNORECASE)


def test_docstrings_say_what_and_why_not_when():
    dated = []
    for path in modules(*PACKAGES, "bench"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node) or ""
                if HISTORY.search(doc):
                    dated.append(f"{path.relative_to(REPO)}: {getattr(node, 'name', 'module')}: "
                                 f"{HISTORY.search(doc).group(0)!r}")
    assert dated == []
