"""containerd's list filters, the subset its clients send to snapshotters:
`name==x`, `parent=="x"`, `kind==committed`, `labels."key"==value`, `labels.key` (present),
`!=`; clauses joined by commas must all hold, and any one of several filters may match."""

from __future__ import annotations

import re

from converter.format.errors import ConfigError
from snapshotter.service.store import KIND_NAMES, Snapshot

_CLAUSE = re.compile(r'^(?P<field>[a-z]+)(?:\.(?P<key>"(?:[^"\\]|\\.)*"|[^=!~]+))?'
                     r'(?:(?P<op>==|!=)(?P<value>"(?:[^"\\]|\\.)*"|.*))?$')


def _split(text: str) -> list[str]:
    parts, current, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _unquote(text: str) -> str:
    return text[1:-1].replace('\\"', '"').replace("\\\\", "\\") if len(text) >= 2 and text[0] == '"' else text


def _field(snap: Snapshot, name: str, key: str | None) -> str | None:
    if name == "labels":
        return snap.labels.get(key or "")
    return {"name": snap.key, "parent": snap.parent, "kind": KIND_NAMES.get(snap.kind, "unknown")}.get(name)


def compile_filters(filters: list[str]) -> list[list[tuple[str, str | None, str | None, str | None]]]:
    compiled = []
    for text in filters:
        clauses = []
        for clause in _split(text):
            m = _CLAUSE.match(clause)
            if m is None or m["field"] not in ("name", "parent", "kind", "labels"):
                raise ConfigError(f"unsupported snapshot filter {clause!r}")
            key = _unquote(m["key"]) if m["key"] else None
            value = _unquote(m["value"]) if m["value"] is not None else None
            clauses.append((m["field"], key, m["op"], value))
        compiled.append(clauses)
    return compiled


def matches(snap: Snapshot, compiled: list[list[tuple[str, str | None, str | None, str | None]]]) -> bool:
    if not compiled:
        return True
    for clauses in compiled:
        ok = True
        for name, key, op, value in clauses:
            actual = _field(snap, name, key)
            if op is None:
                ok = actual is not None and actual != ""
            elif op == "==":
                ok = actual == value
            else:
                ok = actual != value
            if not ok:
                break
        if ok:
            return True
    return False
