"""The FUSE reader's memory cache of decompressed chunks (snapshotter/fs/file_reader.py) keeps within
its byte budget by its own accounting, dropping the least recently used first."""

from __future__ import annotations

from snapshotter.fs.file_reader import MemoryChunks

PIECE = 64 * 1024


def test_the_memory_cache_keeps_within_its_budget_and_drops_the_least_recently_used() -> None:
    budget = 1 << 20
    memory = MemoryChunks(budget)
    hot = b"hot".ljust(32, b"\0")
    memory.put(hot, b"h" * PIECE)
    for i in range(64):  # four times the budget goes through
        digest = i.to_bytes(32, "big")
        memory.put(digest, bytes([i]) * PIECE)
        assert memory.get(hot) is not None  # used all the time: never the one dropped
        assert memory._used <= budget
        assert memory._used == sum(len(v) for v in memory._items.values())
    held = [i for i in range(64) if memory.get(i.to_bytes(32, "big")) is not None]
    assert held == list(range(64 - len(held), 64)) and len(held) == budget // PIECE - 1  # the newest, and hot


def test_a_chunk_larger_than_a_quarter_of_the_budget_is_not_kept() -> None:
    memory = MemoryChunks(1 << 20)
    memory.put(b"a" * 32, b"x" * ((1 << 20) // 4 + 1))
    assert memory.get(b"a" * 32) is None and memory._used == 0
