"""Blocking byte streams for the converter's worker threads.

`AsyncIterReader` lets a worker thread pull bytes from an async iterator running on the event
loop (a registry download), so the CPU-bound conversion never runs on the loop. `open_decompressed`
undoes a layer's gzip/zstd compression as a stream, with bounded memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

import zstandard

from converter.format.errors import FormatError

try:  # ISA-L inflates gzip about 3x faster than zlib: gunzip is the converter's largest single cost
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal has wheels for the platforms we run on
    import zlib as _zlib  # type: ignore[no-redef]



async def _next(source: AsyncIterator[bytes]) -> bytes:
    return await anext(source)

class AsyncIterReader:
    """A blocking `read(n)` over an async iterator of byte blocks; call only from a worker thread."""

    def __init__(
        self,
        source: AsyncIterator[bytes],
        loop: asyncio.AbstractEventLoop,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self._source = source
        self._loop = loop
        self._buffer = memoryview(b"")
        self._eof = False
        self._on_bytes = on_bytes

    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            block: bytes = asyncio.run_coroutine_threadsafe(_next(self._source), self._loop).result()
        except StopAsyncIteration:
            self._eof = True
            return False
        if self._on_bytes is not None:
            self._on_bytes(len(block))
        self._buffer = memoryview(block)
        return True

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = [bytes(self._buffer)]
            while self._fill():
                parts.append(bytes(self._buffer))
            self._buffer = memoryview(b"")
            return b"".join(parts)
        while not self._buffer:
            if not self._fill():
                return b""
        out = bytes(self._buffer[:n])
        self._buffer = self._buffer[n:]
        return out

    def drain(self) -> None:
        """Read to the end, so the source's own end-of-stream checks (digest) run."""
        while self.read(1 << 20):
            pass


class _GzipReader:
    """Streaming gunzip that also accepts multi-member gzip files (pigz, concatenation)."""

    def __init__(self, raw: BinaryIO, what: str) -> None:
        self._raw = raw
        self._what = what
        self._inflate = _zlib.decompressobj(wbits=31)
        self._out = b""
        self._pos = 0  # read position in _out: slicing from the front would copy the rest each time
        self._eof = False
        self._started = False

    def _pump(self) -> None:
        block = self._raw.read(1 << 20)
        try:
            if not block:
                if self._started and not self._inflate.eof:
                    raise FormatError(f"{self._what}: gzip stream is truncated")
                self._eof = True
                return
            self._started = True
            out = self._inflate.decompress(block)
            while self._inflate.eof and self._inflate.unused_data:
                rest = self._inflate.unused_data
                if not rest.strip(b"\0"):  # zero padding after the last member is harmless
                    break
                self._inflate = _zlib.decompressobj(wbits=31)
                out += self._inflate.decompress(rest)
        except _zlib.error as exc:  # type: ignore[misc]  # isal and zlib both define error
            raise FormatError(f"{self._what}: corrupt gzip data ({exc})") from None
        if out:
            self._out = self._out[self._pos:] + out
            self._pos = 0

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._out) - self._pos < n):
            self._pump()
        end = len(self._out) if n < 0 else self._pos + n
        data = self._out[self._pos:end]
        self._pos += len(data)
        return data


class _ZstdReader:
    def __init__(self, raw: BinaryIO, what: str) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._reader.read(n)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{self._what}: corrupt zstd data ({exc})") from None


class _ExactReader:
    """Makes `read(n)` return exactly n bytes unless the stream ends: the tar walker relies on it."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def read(self, n: int = -1) -> bytes:
        first = self._inner.read(n)
        if n < 0 or len(first) == n or not first:
            return first
        parts = [first]
        got = len(first)
        while got < n:
            more = self._inner.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)


def open_decompressed(raw: BinaryIO, compression: str, what: str) -> BinaryIO:
    """A stream of the uncompressed tar inside a layer blob compressed with `compression`."""
    if compression == "gzip":
        inner: BinaryIO = _GzipReader(raw, what)  # type: ignore[assignment]
    elif compression == "zstd":
        inner = _ZstdReader(raw, what)  # type: ignore[assignment]
    elif compression == "none":
        inner = raw
    else:
        raise FormatError(f"{what}: unknown compression {compression!r}")
    return _ExactReader(inner)  # type: ignore[return-value]
