"""The house's layers point one way (issue 11): ground ← tasks ← targets ← flows ← cli.

Read from the code's own imports (``ast``, every import statement, also the
ones inside functions), so a lazy ``from flows import …`` in a task counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Package → its floor; a module may import packages on its floor or below.
FLOORS = {"mlflow_rollout": 0, "tasks": 1, "targets": 2, "flows": 3, "cli": 4}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _upward(package: str) -> list[str]:
    floor = FLOORS[package]
    leaks = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in FLOORS and FLOORS[top] > floor:
                leaks.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({top} is above {package})")
    return leaks


@pytest.mark.parametrize("package", list(FLOORS))
def test_no_import_runs_back_up(package: str) -> None:
    assert _upward(package) == []


def test_flows_and_cli_never_probe_the_target() -> None:
    """Everything a flow needs is on the Target protocol: no hasattr/getattr on a target."""
    probes = []
    for package in ("flows", "cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("hasattr", "getattr") and node.args
                        and isinstance(node.args[0], ast.Name) and node.args[0].id == "target"):
                    probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(target, …)")
    assert probes == []


def test_the_checker_sees_a_leak(tmp_path: Path) -> None:
    """The test above can fail: a lazy upward import inside a function is found."""
    module = tmp_path / "leaky.py"
    module.write_text("def f():\n    from flows.rollout import rollout\n    return rollout\n")
    assert _imports(module) == [(2, "flows.rollout")]
