"""Read the ``# --`` documentation comments of charts/mlflow/values.yaml.

A value is documented by a comment block that starts with ``# --`` right above
its key (the helm-docs convention). A key whose ancestor is documented counts
as documented too (e.g. ``resources.requests.cpu`` under ``resources``).

Run as a script to print the README values table:

    .venv/bin/python tests/chart/values_doc.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "mlflow"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*|\"[^\"]+\"):(?:\s|$)")


def documented_keys(path: Path = CHART_DIR / "values.yaml") -> dict[str, str]:
    """Map ``dotted.key`` → its description, for every key with a ``# --`` comment."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("- "):
            if not stripped:
                pending = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"].strip('"')))
        if pending is not None:
            docs[".".join(k for _, k in stack)] = " ".join(p for p in pending if p)
            pending = None
    return docs


def leaf_paths(values: object, prefix: str = "") -> list[str]:
    """Dotted paths of all leaves (empty maps and lists count as leaves)."""
    if isinstance(values, dict) and values:
        out: list[str] = []
        for key, value in values.items():
            out += leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [prefix]


def undocumented(path: Path = CHART_DIR / "values.yaml") -> list[str]:
    docs = documented_keys(path)
    values = yaml.safe_load(path.read_text())
    missing = []
    for leaf in leaf_paths(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in docs for i in range(1, len(parts) + 1)):
            missing.append(leaf)
    return missing


def _default(values: dict, dotted: str) -> str:
    node: object = values
    for part in dotted.split("."):
        node = node[part]  # type: ignore[index]
    return json.dumps(node).replace("|", "\\|")


def values_table(path: Path = CHART_DIR / "values.yaml") -> str:
    values = yaml.safe_load(path.read_text())
    rows = ["| Key | Default | Description |", "|---|---|---|"]
    for key, text in documented_keys(path).items():
        description = text.replace("|", "\\|")
        rows.append(f"| `{key}` | `{_default(values, key)}` | {description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(values_table())
