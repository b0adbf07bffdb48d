"""Snapshot metadata that survives a restart: keys, parents, kinds, labels, and which committed
snapshots are lazily served layers. One SQLite file; every change is one transaction.

The rules are containerd's: a parent must be committed, a key is unique, a snapshot with
children cannot be removed, only active snapshots can be committed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from converter.format.errors import AlreadyExistsError, FailedPreconditionError, NotFoundError

T = TypeVar("T")

VIEW, ACTIVE, COMMITTED = 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  key TEXT NOT NULL UNIQUE,
  parent TEXT NOT NULL DEFAULT '',
  kind INTEGER NOT NULL,
  created REAL NOT NULL,
  updated REAL NOT NULL,
  labels TEXT NOT NULL DEFAULT '{}',
  layer TEXT,            -- digest of the lazily served layer, NULL for ordinary snapshots
  size INTEGER NOT NULL DEFAULT 0,
  inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE TABLE IF NOT EXISTS layers (
  digest TEXT PRIMARY KEY,
  slot INTEGER NOT NULL UNIQUE,  -- high bits of the layer's inode numbers: stable across restarts
  repository TEXT NOT NULL,
  size INTEGER NOT NULL,
  created REAL NOT NULL
);
"""


@dataclass
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)
    layer: str | None = None
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class LayerRecord:
    digest: str
    slot: int
    repository: str
    size: int


class SnapshotStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed snapshot must survive a power cut
        self._db.executescript(_SCHEMA)
        # every fsync (synchronous=FULL) would stall every FUSE read on the loop: callers on the
        # loop use run(), one thread keeps SQLite access serialized
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-store")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` (a method of this store, or steps using it) on the store's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._db.close()

    # ---- snapshots ----------------------------------------------------------------------------

    def _row(self, row: tuple[Any, ...]) -> Snapshot:
        return Snapshot(row[0], row[1], row[2], row[3], row[4], row[5], json.loads(row[6]), row[7], row[8], row[9])

    _COLUMNS = "id, key, parent, kind, created, updated, labels, layer, size, inodes"

    def find(self, key: str) -> Snapshot | None:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return self._row(row) if row else None

    def get(self, key: str) -> Snapshot:
        found = self.find(key)
        if found is None:
            raise NotFoundError(f"snapshot {key!r} does not exist")
        return found

    def by_id(self, snapshot_id: int) -> Snapshot | None:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[Snapshot]:
        return [self._row(r) for r in self._db.execute(f"SELECT {self._COLUMNS} FROM snapshots ORDER BY id")]

    def create(self, key: str, parent: str, kind: int, labels: dict[str, str], layer: str | None = None,
               size: int = 0, inodes: int = 0) -> Snapshot:
        if not key:
            raise FailedPreconditionError("snapshot key must not be empty")
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if self.find(key) is not None:
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            if parent:
                p = self.find(parent)
                if p is None:
                    raise NotFoundError(f"parent snapshot {parent!r} does not exist")
                if p.kind != COMMITTED:
                    raise FailedPreconditionError(f"parent {parent!r} is not committed")
            cur = self._db.execute(
                "INSERT INTO snapshots (key, parent, kind, created, updated, labels, layer, size, inodes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, parent, kind, now, now, json.dumps(labels), layer, size, inodes))
            assert cur.lastrowid is not None
            return Snapshot(cur.lastrowid, key, parent, kind, now, now, dict(labels), layer, size, inodes)

    def commit(self, name: str, key: str, labels: dict[str, str], size: int, inodes: int) -> Snapshot:
        """Turn active snapshot `key` into committed snapshot `name` (same id, so the same directory)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            active = self.get(key)
            if active.kind != ACTIVE:
                raise FailedPreconditionError(f"snapshot {key!r} is {KIND_NAMES[active.kind]}, not active")
            if self.find(name) is not None:
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            merged = {**active.labels, **labels}
            now = time.time()
            self._db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, updated = ?, size = ?, inodes = ?"
                             " WHERE id = ?", (name, COMMITTED, json.dumps(merged), now, size, inodes, active.id))
            return self.get(name)

    def remove(self, key: str) -> Snapshot:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            snap = self.get(key)
            child = self._db.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone()
            if child:
                raise FailedPreconditionError(f"snapshot {key!r} has a child ({child[0]!r}): remove that first")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
            return snap

    def set_labels(self, key: str, labels: dict[str, str]) -> Snapshot:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            snap = self.get(key)
            self._db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                             (json.dumps(labels), time.time(), snap.id))
            return self.get(key)

    def chain(self, snap: Snapshot) -> list[Snapshot]:
        """The committed ancestors of `snap`, nearest first."""
        out: list[Snapshot] = []
        parent = snap.parent
        while parent:
            p = self.get(parent)
            out.append(p)
            parent = p.parent
        return out

    # ---- lazily served layers -----------------------------------------------------------------

    def layer(self, digest: str) -> LayerRecord | None:
        row = self._db.execute("SELECT digest, slot, repository, size FROM layers WHERE digest = ?", (digest,)).fetchone()
        return LayerRecord(*row) if row else None

    def layers(self) -> list[LayerRecord]:
        return [LayerRecord(*r) for r in self._db.execute("SELECT digest, slot, repository, size FROM layers ORDER BY slot")]

    def add_layer(self, digest: str, repository: str, size: int) -> LayerRecord:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            existing = self.layer(digest)
            if existing is not None:
                return existing
            row = self._db.execute("SELECT COALESCE(MAX(slot), 0) + 1 FROM layers").fetchone()
            self._db.execute("INSERT INTO layers (digest, slot, repository, size, created) VALUES (?, ?, ?, ?, ?)",
                             (digest, row[0], repository, size, time.time()))
            return LayerRecord(digest, row[0], repository, size)

    def layer_in_use(self, digest: str) -> bool:
        return self._db.execute("SELECT 1 FROM snapshots WHERE layer = ? LIMIT 1", (digest,)).fetchone() is not None

    def drop_layer(self, digest: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM layers WHERE digest = ?", (digest,))
