"""Prefetch modes of the FUSE reader: the default fetches a file ahead only once it is read
sequentially past a threshold (a whole-file reader), never on a library's scattered page faults."""

from __future__ import annotations

import asyncio
from typing import cast

from peer.fetcher import ChunkFetcher
from snapshotter.config import SnapshotterConfig
from snapshotter.fs.file_reader import FileReader
from tests.test_file_reader_tasks import GatedFetcher, _chunks, _source

MiB = 1 << 20


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_default_fetches_ahead_only_after_a_sequential_run() -> None:
    config = SnapshotterConfig()
    fetcher = GatedFetcher()
    fetcher.gate.set()
    reader = FileReader(cast(ChunkFetcher, fetcher), 64 << 20, config.prefetch, 64, config.prefetch_sequential_bytes)
    chunks = _chunks(16)
    source = _source(chunks)
    try:
        for offset in (10 * MiB, 2 * MiB + 4096, 14 * MiB, 6 * MiB):  # page faults all over a library
            await reader.read(source, 1, chunks, 16 * MiB, offset, 128 << 10)
        await _settle()
        assert fetcher.fetches == []
        for offset in range(0, config.prefetch_sequential_bytes, MiB):  # a reader going through the file
            await reader.read(source, 2, chunks, 16 * MiB, offset, MiB)
        await _settle()
        rest = [c.digest_hex for c in chunks[config.prefetch_sequential_bytes // MiB:]]
        assert sorted(fetcher.fetches) == sorted(rest)
    finally:
        await reader.close()


async def test_file_mode_still_fetches_the_rest_on_the_first_read() -> None:
    fetcher = GatedFetcher()
    fetcher.gate.set()
    reader = FileReader(cast(ChunkFetcher, fetcher), 64 << 20, "file", 8)
    chunks = _chunks(6)
    source = _source(chunks)
    try:
        await reader.read(source, 1, chunks, 6 * MiB, 3 * MiB, 4096)
        await _settle()
        assert sorted(fetcher.fetches) == sorted(c.digest_hex for c in chunks[4:])
    finally:
        await reader.close()
