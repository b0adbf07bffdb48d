"""The object store for passthrough: whole files written once, verified by size, kept across a
restart, evicted oldest use first but never while open, and never on overlayfs."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from converter.format.errors import ConfigError, FormatError, NotFoundError
from snapshotter.config import SnapshotterConfig
from snapshotter.fs.objects import (
    OVERLAYFS_SUPER_MAGIC,
    ObjectStore,
    ObjectTooLargeError,
    filesystem_magic,
    object_key,
    store_root,
)

MIB = 1 << 20


def content(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


async def pieces_of(data: bytes, size: int = 64 << 10, started: list[int] | None = None) -> AsyncIterator[bytes]:
    if started is not None:
        started.append(1)
    for at in range(0, len(data), size):
        await asyncio.sleep(0)  # other callers run between pieces
        yield data[at:at + size]


def key_of(n: int) -> str:
    return object_key(n, [f"sha256:{n:064x}"])


async def test_a_file_is_written_once_and_read_back(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects", 64 * MIB)
    data = content(3 * MIB + 17, 1)
    key = key_of(1)
    path = await store.materialise(key, len(data), pieces_of(data))
    assert path.read_bytes() == data
    assert store.path(key) == path and store.used_bytes == len(data)
    assert os.stat(path).st_mode & 0o777 == 0o444  # nothing writes to a backing file
    assert sorted(os.listdir(store.root)) == [key]  # no temp file left
    # already there: the second call's pieces are never read
    started: list[int] = []
    assert await store.materialise(key, len(data), pieces_of(data, started=started)) == path
    assert started == []
    await store.close()


async def test_concurrent_materialise_of_one_key_shares_one_write(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, 64 * MIB)
    data = content(2 * MIB, 2)
    started: list[int] = []
    paths = await asyncio.gather(*(store.materialise(key_of(2), len(data), pieces_of(data, started=started))
                                   for _ in range(5)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == data
    assert started == [1]  # one writer consumed its pieces; the others joined it
    await store.close()


@pytest.mark.parametrize("pieces, promised", [(b"x" * 1000, 1001), (b"x" * 1000, 999)])
async def test_a_size_mismatch_publishes_nothing(tmp_path: Path, pieces: bytes, promised: int) -> None:
    store = ObjectStore(tmp_path, 64 * MIB)
    with pytest.raises(FormatError, match="promised"):
        await store.materialise(key_of(3), promised, pieces_of(pieces, size=100))
    assert store.path(key_of(3)) is None and os.listdir(tmp_path) == []
    await store.close()


async def test_a_file_larger_than_the_store_is_refused(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, 64 * MIB)
    with pytest.raises(ObjectTooLargeError, match="object_store_bytes"):
        await store.materialise(key_of(4), 65 * MIB, pieces_of(b""))
    await store.close()


async def test_a_bad_key_is_refused(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, 64 * MIB)
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        await store.materialise("../etc/passwd", 1, pieces_of(b"x"))
    await store.close()


async def test_a_restart_keeps_complete_objects_and_drops_the_rest(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, 64 * MIB)
    first, second = content(MIB, 5), content(2 * MIB + 3, 6)
    await store.materialise(key_of(5), len(first), pieces_of(first))
    await store.materialise(key_of(6), len(second), pieces_of(second))
    await store.close()
    # a crash in the middle of a write, and a name the store never wrote
    (tmp_path / f".tmp-{key_of(7)}-1-2").write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("stray")
    reopened = ObjectStore(tmp_path, 64 * MIB)
    assert set(reopened.keys()) == {key_of(5), key_of(6)}
    assert reopened.used_bytes == len(first) + len(second)
    assert sorted(os.listdir(tmp_path)) == sorted([key_of(5), key_of(6)])
    path = reopened.path(key_of(6))
    assert path is not None and path.read_bytes() == second
    await reopened.close()


async def test_eviction_is_oldest_use_first_never_pinned_and_asks_first(tmp_path: Path) -> None:
    asked: list[tuple[str, bool]] = []  # the key, and whether its file was still there when asked
    store = ObjectStore(tmp_path, 64 * MIB, before_evict=lambda key: asked.append((key, (tmp_path / key).exists())))
    for n in range(10, 14):
        data = content(MIB, n)
        await store.materialise(key_of(n), len(data), pieces_of(data))
    store.pin(key_of(10))  # the oldest, but open in passthrough
    store.path(key_of(11))  # used again: now the newest
    removed = store.evict_to(2 * MIB)
    assert removed == [key_of(12), key_of(13)]
    assert asked == [(key_of(12), True), (key_of(13), True)]
    assert set(store.keys()) == {key_of(10), key_of(11)}
    assert (tmp_path / key_of(10)).exists() and not (tmp_path / key_of(12)).exists()
    # over the limit with only pinned files left: the pinned one stays all the same
    assert store.evict_to(0) == [key_of(11)]
    assert store.keys() == [key_of(10)] and store.pinned(key_of(10)) == 1
    store.unpin(key_of(10))
    assert store.evict_to(0) == [key_of(10)] and store.used_bytes == 0
    with pytest.raises(NotFoundError):
        store.pin(key_of(10))
    await store.close()


async def test_a_failing_evict_hook_keeps_the_file(tmp_path: Path) -> None:
    def refuse(key: str) -> None:
        raise OSError(16, "backing id still in use")

    store = ObjectStore(tmp_path, 64 * MIB, before_evict=refuse)
    data = content(MIB, 20)
    await store.materialise(key_of(20), len(data), pieces_of(data))
    assert store.evict_to(0) == []
    assert store.path(key_of(20)) is not None
    await store.close()


async def test_a_new_file_makes_room_first(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, 3 * MIB)
    for n in (30, 31, 32):
        data = content(MIB, n)
        await store.materialise(key_of(n), len(data), pieces_of(data))
    data = content(2 * MIB, 33)
    await store.materialise(key_of(33), len(data), pieces_of(data))
    assert store.keys() == [key_of(32), key_of(33)] and store.used_bytes == 3 * MIB
    await store.close()


def test_the_store_lives_under_the_snapshotter_root_by_default() -> None:
    sc = SnapshotterConfig()
    assert store_root(sc.root, sc.object_store_dir) == Path(sc.root) / "objects"
    assert store_root(sc.root, "/srv/objects") == Path("/srv/objects")


def test_a_store_on_overlayfs_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}",
                    str(dirs["merged"])], check=True)
    try:
        assert filesystem_magic(dirs["merged"]) == OVERLAYFS_SUPER_MAGIC
        with pytest.raises(ConfigError, match="is on overlayfs") as refused:
            ObjectStore(dirs["merged"] / "objects", 64 * MIB)
        assert "\n" not in str(refused.value)
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)
