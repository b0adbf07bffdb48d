"""Renders the Helm chart's templates for tests, without helm (not installable here).

Handles exactly the Go-template subset the chart uses — `{{ .Values.x }}`, `.Release.*`, `$.`,
`.` inside `range`, `if` / `if not` / `range` / `end`, whitespace trimming (`{{-`, `-}}`), and
the functions `quote`, `toYaml`, `nindent` — and fails loudly on anything else, so a template
outside the subset cannot pass by accident.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if m.group(1):
            chunk = chunk.rstrip()
        out.append(("text", chunk))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip())
    out.append(("text", text[pos:]))
    return out


def _parse(tokens: list[tuple[str, str]], at: int = 0) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while at < len(tokens):
        kind, value = tokens[at]
        at += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value == "end":
            return nodes, at
        elif value.startswith(("if ", "range ")):
            word, expr = value.split(" ", 1)
            body, at = _parse(tokens, at)
            nodes.append((word, expr, body))
        else:
            nodes.append(("expr", value))
    return nodes, at


def _lookup(path: str, dot: Any, root: dict[str, Any]) -> Any:
    if path == ".":
        return dot
    base: Any = root if path.startswith("$.") or not isinstance(dot, dict) or path.startswith((".Values", ".Release", ".Chart")) else dot
    for part in path.lstrip("$").lstrip(".").split("."):
        if not isinstance(base, dict) or part not in base:
            raise KeyError(f"template refers to {path!r}, which is not set")
        base = base[part]
    return base


def _value(term: str, dot: Any, root: dict[str, Any]) -> Any:
    term = term.strip()
    if term.startswith('"'):
        return json.loads(term)
    if term.lstrip("-").isdigit():
        return int(term)
    if term.startswith((".", "$")):
        return _lookup(term, dot, root)
    raise ValueError(f"unsupported template term {term!r}")


def _apply(func: str, args: list[str], piped: Any, dot: Any, root: dict[str, Any]) -> Any:
    values = [_value(a, dot, root) for a in args]
    if piped is not _NOTHING:
        values.append(piped)
    if func == "quote":
        return json.dumps(str(values[0]))
    if func == "toYaml":
        return yaml.safe_dump(values[0], default_flow_style=False).strip() if values[0] else json.dumps(values[0])
    if func == "nindent":
        width, text = values
        return "\n" + "\n".join(" " * width + line for line in str(text).splitlines())
    if func == "not":
        return not values[0]
    raise ValueError(f"unsupported template function {func!r}")


_NOTHING = object()


def _eval(expr: str, dot: Any, root: dict[str, Any]) -> Any:
    result: Any = _NOTHING
    for stage in expr.split("|"):
        words = stage.split()
        if len(words) == 1 and result is _NOTHING and words[0][0] in '.$"0123456789':
            result = _value(words[0], dot, root)
        else:
            result = _apply(words[0], words[1:], result, dot, root)
    return result


def _render(nodes: list[Any], dot: Any, root: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "expr":
            value = _eval(node[1], dot, root)
            out.append("" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        elif node[0] == "if":
            if _eval(node[1], dot, root):
                out.append(_render(node[2], dot, root))
        elif node[0] == "range":
            for item in _eval(node[1], dot, root) or []:
                out.append(_render(node[2], item, root))
    return "".join(out)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def render_chart(chart: Path, values: dict[str, Any] | None = None, release: str = "pp",
                 namespace: str = "kube-system") -> dict[str, str]:
    """Template file name → rendered text, with `values` over the chart's values.yaml."""
    root = {"Values": _merge(yaml.safe_load((chart / "values.yaml").read_text()), values or {}),
            "Release": {"Name": release, "Namespace": namespace},
            "Chart": yaml.safe_load((chart / "Chart.yaml").read_text())}
    rendered = {}
    for template in sorted((chart / "templates").iterdir()):
        nodes, _ = _parse(_tokens(template.read_text()))
        rendered[template.name] = _render(nodes, root, root)
    return rendered
