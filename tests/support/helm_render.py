"""Renders the Helm chart's templates for tests, without helm (not installable here).

Handles exactly the Go-template subset the chart uses, the way Go's text/template and Helm do it,
and fails loudly on anything else, so that a template outside the subset cannot pass by accident:

* actions: `{{ pipeline }}`, `if` / `else` / `end`, `range` (over lists), `define`, comments
  `{{/* ... */}}`, whitespace trimming with `{{-` and `-}}`;
* terms: `.` (the current context), `.a.b` (relative to it: inside `range` that is the item, so the
  chart must write `$.Values`), `$`, `$.a.b`, "strings" and integers;
* functions: `quote`, `squote`, `toYaml`, `toJson`, `nindent`, `indent`, `default`, `not`, `and`,
  `or`, `eq`, `include`, `int64`, `trunc`, `trimSuffix`, `printf` (%s, %d), `b64enc`, `randAlphaNum`,
  `dig`, `toString`, `fail`, `.Files.Get` (a file of the chart, as a function of one argument),
  and `lookup` (answers from the `lookups` given to `render_chart`, else an empty map, as
  `helm template` does without a cluster);
* parenthesized sub-pipelines as arguments: `default (randAlphaNum 8 | b64enc)`.

Like Helm, numbers in values are float64 and print like Go's `%v` (`1e+06`, `2.147483648e+10`):
templates that need an integer must pipe it through `int64`.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import string
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-)?\s*(.*?)\s*(-)?\}\}", re.DOTALL)


class TemplateError(Exception):
    """A template uses something outside the supported subset, or refers to a missing value."""


class GoInt(int):
    """An integer as Go has it (from a literal or `int64`), as opposed to a float64 from values."""


# --- printing values the way Go's fmt does -----------------------------------------------------

def _go_float(value: float) -> str:
    """fmt's %v of a float64: strconv 'g' with the shortest digits, %e from exponent 6 on."""
    if math.isnan(value) or math.isinf(value):
        return {math.inf: "+Inf", -math.inf: "-Inf"}.get(value, "NaN")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    digits_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()[1:]
    digits = "".join(map(str, digits_tuple))
    point = len(digits) + int(exponent)  # digits before the decimal point
    x = point - 1
    if x < -4 or x >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'+' if x >= 0 else '-'}{abs(x):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def _go_str(value: Any) -> str:
    if value is None:
        return ""  # Helm prints a missing value as nothing
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, GoInt):
        return str(int(value))
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return value
    raise TemplateError(f"refusing to print {type(value).__name__} {value!r} directly: use toYaml or toJson")


def _plain(value: Any) -> Any:
    """Values as sigs.k8s.io/yaml serialises them: integral float64s without a fraction."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, GoInt):
        return int(value)
    return value


def _as_helm_values(value: Any) -> Any:
    """Values files are decoded into float64 numbers by Helm."""
    if isinstance(value, dict):
        return {k: _as_helm_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_helm_values(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --- parsing -------------------------------------------------------------------------------------

def _tokens(text: str, where: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if m.group(1):
            chunk = chunk.rstrip(" \t\r\n")
        out.append(("text", chunk))
        out.append(("action", m.group(2)))
        pos = m.end()
        if m.group(3):
            rest = text[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    tail = text[pos:]
    if "{{" in tail:  # a stray "}}" in text is text to Go, as after an escaped "{{"
        raise TemplateError(f"{where}: unbalanced braces")
    out.append(("text", tail))
    return out


def _parse(tokens: list[tuple[str, str]], at: int, where: str,
           closers: tuple[str, ...] = ()) -> tuple[list[Any], int, str]:
    """Nodes up to one of `closers` ("end", "else"); returns (nodes, next index, closer found)."""
    nodes: list[Any] = []
    while at < len(tokens):
        kind, value = tokens[at]
        at += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        if value.startswith("/*"):
            if not value.endswith("*/"):
                raise TemplateError(f"{where}: malformed comment {value!r}")
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in ("end", "else"):
            if value != word:
                raise TemplateError(f"{where}: unsupported {value!r} (only plain `else` and `end`)")
            if word not in closers:
                raise TemplateError(f"{where}: unexpected {{{{ {word} }}}}")
            return nodes, at, word
        if word in ("if", "range"):
            expr = value[len(word):].strip()
            if word == "range" and (":=" in expr or "," in expr):
                raise TemplateError(f"{where}: range with variables is not supported")
            body, at, closer = _parse(tokens, at, where, ("end", "else"))
            otherwise: list[Any] = []
            if closer == "else":
                otherwise, at, _ = _parse(tokens, at, where, ("end",))
            nodes.append((word, expr, body, otherwise))
        elif word == "define":
            name = json.loads(value[len(word):].strip())
            body, at, _ = _parse(tokens, at, where, ("end",))
            nodes.append(("define", name, body))
        elif word in ("with", "template", "block", "break", "continue") or ":=" in value:
            raise TemplateError(f"{where}: unsupported action {value!r}")
        else:
            nodes.append(("expr", value))
    if closers:
        raise TemplateError(f"{where}: missing {{{{ end }}}}")
    return nodes, at, ""


# --- evaluation ----------------------------------------------------------------------------------

def _words(stage: str) -> list[str]:
    """Whitespace-separated words of a pipeline stage; "strings" and (sub pipelines) stay whole."""
    words, current, depth, quoted = [], [], 0, False
    for i, ch in enumerate(stage):
        if ch == '"' and (i == 0 or stage[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
            if depth < 0:
                raise TemplateError(f"unbalanced parentheses in {stage!r}")
        if ch.isspace() and not quoted and depth == 0:
            if current:
                words.append("".join(current))
                current = []
            continue
        current.append(ch)
    if quoted or depth:
        raise TemplateError(f"unbalanced quotes or parentheses in {stage!r}")
    if current:
        words.append("".join(current))
    return words


class _Renderer:
    def __init__(self, root: dict[str, Any], lookups: dict[tuple[str, str, str, str], Any] | None = None,
                 chart: Path = Path(".")) -> None:
        self.root = root
        self.chart = chart
        self.defines: dict[str, list[Any]] = {}
        self.lookups = lookups or {}

    def lookup(self, term: str, dot: Any) -> Any:
        if term == ".":
            return dot
        if term == "$":
            return self.root
        base, path = (self.root, term[2:]) if term.startswith("$.") else (dot, term[1:])
        for part in path.split("."):
            if not isinstance(base, dict):
                raise TemplateError(f"{term!r}: cannot read {part!r} from {type(base).__name__} {base!r}")
            if part not in base:
                raise TemplateError(f"template refers to {term!r}, which is not set")
            base = base[part]
        return base

    def term(self, word: str, dot: Any) -> Any:
        if word.startswith("(") and word.endswith(")"):
            return self.pipeline(word[1:-1], dot)
        if word.startswith('"'):
            return json.loads(word)
        if re.fullmatch(r"-?\d+", word):
            return GoInt(int(word))
        if word in (".", "$") or word.startswith((".", "$.")):
            return self.lookup(word, dot)
        raise TemplateError(f"unsupported template term {word!r}")

    def call(self, func: str, args: list[Any]) -> Any:
        def arity(n: int) -> None:
            if len(args) != n:
                raise TemplateError(f"{func} takes {n} arguments, got {len(args)}")

        if func == "quote":
            return " ".join(json.dumps(_go_str(a), ensure_ascii=False) for a in args if a is not None)
        if func == "squote":
            return " ".join(f"'{_go_str(a)}'" for a in args if a is not None)
        if func == "toYaml":
            arity(1)
            if not isinstance(args[0], (dict, list)):
                raise TemplateError("toYaml is only used on maps and lists here")
            return yaml.safe_dump(_plain(args[0]), default_flow_style=False, sort_keys=True).rstrip("\n")
        if func == "toJson":
            arity(1)
            text = json.dumps(_plain(args[0]), separators=(",", ":"), ensure_ascii=False)
            return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        if func in ("indent", "nindent"):
            arity(2)
            width, text = args
            pad = " " * int(width)
            out = pad + _go_str(text).replace("\n", "\n" + pad)
            return "\n" + out if func == "nindent" else out
        if func == "default":
            arity(2)
            return args[1] if args[1] not in (None, "", [], {}, 0, False) else args[0]
        if func == "not":
            arity(1)
            return not args[0]
        if func == "and":
            for a in args:
                if not a:
                    return a
            return args[-1]
        if func == "or":
            for a in args:
                if a:
                    return a
            return args[-1]
        if func == "eq":
            arity(2)
            kinds = {type(a) if not isinstance(a, bool) else bool for a in args}
            if len(kinds) != 1:
                raise TemplateError(f"eq: incompatible types for comparison: {args!r}")
            return args[0] == args[1]
        if func == "int64":
            arity(1)
            if isinstance(args[0], str):
                return GoInt(int(args[0]) if re.fullmatch(r"-?\d+", args[0]) else 0)
            return GoInt(int(args[0] or 0))
        if func == "trunc":
            arity(2)
            return _go_str(args[1])[: int(args[0])]
        if func == "trimSuffix":
            arity(2)
            text, suffix = _go_str(args[1]), args[0]
            return text[: -len(suffix)] if suffix and text.endswith(suffix) else text
        if func == "printf":
            if not args or not isinstance(args[0], str):
                raise TemplateError("printf needs a format string")
            fmt, rest = args[0], list(args[1:])
            if fmt.count("%") != len(rest) or re.search(r"%[^sd]", fmt):
                raise TemplateError(f"printf: only %s and %d, one per argument: {fmt!r}")
            return re.sub(r"%[sd]", lambda m: _go_str(rest.pop(0)), fmt)
        if func == "b64enc":
            arity(1)
            return base64.b64encode(_go_str(args[0]).encode()).decode()
        if func == "randAlphaNum":
            arity(1)
            return "".join(random.SystemRandom().choice(string.ascii_letters + string.digits) for _ in range(int(args[0])))
        if func == "dig":
            if len(args) < 3 or not isinstance(args[-1], dict):
                raise TemplateError("dig takes keys, a default and a map")
            *keys, fallback, current = args
            for key in keys:
                if not isinstance(current, dict) or key not in current:
                    return fallback
                current = current[key]
            return current
        if func == "lookup":
            arity(4)
            return self.lookups.get(tuple(args), {})
        if func == "toString":
            arity(1)
            return _go_str(args[0])
        if func == "fail":
            arity(1)
            raise TemplateError(f"fail: {_go_str(args[0])}")
        if func == ".Files.Get":
            arity(1)
            path = (self.chart / _go_str(args[0])).resolve()
            if not path.is_relative_to(self.chart.resolve()) or not path.is_file():
                return ""  # Helm: a missing file is empty
            return path.read_text()
        raise TemplateError(f"unsupported template function {func!r}")

    def pipeline(self, expr: str, dot: Any) -> Any:
        result: Any = None
        for index, stage in enumerate(s.strip() for s in _split_pipes(expr)):
            words = _words(stage)
            if not words:
                raise TemplateError(f"empty pipeline stage in {expr!r}")
            head = words[0]
            if head in (".Files.Get", "$.Files.Get"):
                head = ".Files.Get"  # the one method the chart calls, like a function
            elif head[0] in '.$"-0123456789(':
                if len(words) != 1 or index:
                    raise TemplateError(f"unsupported pipeline {expr!r}")
                result = self.term(head, dot)
                continue
            if head == "include":
                args = [self.term(w, dot) for w in words[1:]]
                if index:
                    args.append(result)
                if len(args) != 2 or args[0] not in self.defines:
                    raise TemplateError(f"include needs a defined template and a context: {expr!r}")
                result = self.render(self.defines[args[0]], args[1])
                continue
            args = [self.term(w, dot) for w in words[1:]]
            if index:
                args.append(result)
            result = self.call(head, args)
        return result

    def render(self, nodes: list[Any], dot: Any) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "expr":
                out.append(_go_str(self.pipeline(node[1], dot)))
            elif node[0] == "if":
                out.append(self.render(node[2] if self.pipeline(node[1], dot) else node[3], dot))
            elif node[0] == "range":
                items = self.pipeline(node[1], dot)
                if items is not None and not isinstance(items, list):
                    raise TemplateError(f"range over {type(items).__name__} is not supported")
                if items:
                    out.extend(self.render(node[2], item) for item in items)
                else:
                    out.append(self.render(node[3], dot))
            elif node[0] == "define":
                pass  # collected before rendering
        return "".join(out)

    def collect(self, nodes: list[Any], where: str) -> None:
        for node in nodes:
            if node[0] == "define":
                if node[1] in self.defines:
                    raise TemplateError(f"{where}: template {node[1]!r} defined twice")
                self.defines[node[1]] = node[2]


def _split_pipes(expr: str) -> list[str]:
    parts, current, quoted, depth = [], [], False, 0
    for i, ch in enumerate(expr):
        if ch == '"' and (i == 0 or expr[i - 1] != "\\"):
            quoted = not quoted
        elif not quoted and ch in "()":
            depth += 1 if ch == "(" else -1
        if ch == "|" and not quoted and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if nested else value
    return merged


def render_chart(chart: Path, values: dict[str, Any] | None = None, release: str = "pp",
                 namespace: str = "kube-system", revision: int = 1,
                 lookups: dict[tuple[str, str, str, str], Any] | None = None) -> dict[str, str]:
    """Template file name → rendered text (files starting with `_` only hold definitions).

    `lookups`: what `lookup apiVersion kind namespace name` finds in the cluster (objects of an
    earlier release); anything else is an empty map."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    root = {
        "Values": _as_helm_values(_merge(yaml.safe_load((chart / "values.yaml").read_text()), values or {})),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "Revision": GoInt(revision),
                    "IsInstall": revision == 1, "IsUpgrade": revision > 1},
        "Chart": {key[:1].upper() + key[1:]: value for key, value in meta.items()},
    }
    renderer = _Renderer(root, lookups, chart)
    parsed = {}
    for template in sorted((chart / "templates").iterdir()):
        nodes, _, _ = _parse(_tokens(template.read_text(), template.name), 0, template.name)
        renderer.collect(nodes, template.name)
        parsed[template.name] = nodes
    return {name: renderer.render(nodes, root) for name, nodes in parsed.items() if not name.startswith("_")}
