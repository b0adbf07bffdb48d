"""What a node needs to know to fetch one chunk from any tier, and its wire form between peers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from converter.format.digest import digest_to_raw, is_digest
from converter.format.errors import FormatError
from converter.format.toc import MAX_CHUNK_SIZE, Chunk

MAX_HINT_BYTES = 4096


@dataclass(frozen=True)
class ChunkRef:
    """A chunk and where the origin registry has it: `registry/repository`, the layer blob, the frame."""

    digest: str  # sha256:… of the frame's whole uncompressed bytes
    length: int  # the frame's uncompressed size (in format v2 a frame may hold several files' pieces)
    repository: str  # host[:port]/repo of the image the chunk was found in
    blob: str  # digest of the layer blob
    blob_offset: int
    compressed_length: int
    # blob offset of the next chunk frame in the blob (0: unknown); only header frames lie between,
    # so the origin may read across that gap without fetching anyone else's chunk
    next_offset: int = 0

    @classmethod
    def from_chunk(cls, chunk: Chunk, repository: str, blob: str, next_offset: int = 0) -> ChunkRef:
        return cls(chunk.digest_hex, chunk.frame_length, repository, blob, chunk.blob_offset, chunk.compressed_length,
                   next_offset)

    def as_chunk(self) -> Chunk:
        """The whole frame as one chunk (frame_offset 0, frame_length = length): what is verified."""
        return Chunk(0, self.length, self.blob_offset, self.compressed_length, digest_to_raw(self.digest))

    def pack(self) -> bytes:
        return bytes(msgpack.packb([self.digest, self.length, self.repository, self.blob, self.blob_offset,
                                    self.compressed_length, self.next_offset], use_bin_type=True))

    @classmethod
    def unpack(cls, data: bytes) -> ChunkRef:
        """Parse a peer's request; anything malformed is a FormatError."""
        if len(data) > MAX_HINT_BYTES:
            raise FormatError("chunk request too large")
        try:
            fields: Any = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException, TypeError):
            raise FormatError("chunk request is not msgpack") from None
        if not isinstance(fields, list) or len(fields) != 7:
            raise FormatError("chunk request has the wrong shape")
        digest, length, repository, blob, offset, clen, next_offset = fields
        ints = (length, offset, clen, next_offset)
        if not (isinstance(digest, str) and is_digest(digest) and isinstance(blob, str) and is_digest(blob)
                and isinstance(repository, str) and 0 < len(repository) < 512
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints)
                and 0 < length <= MAX_CHUNK_SIZE and 0 < clen <= 2 * MAX_CHUNK_SIZE):
            raise FormatError("chunk request has invalid fields")
        return cls(digest, length, repository, blob, offset, clen, next_offset)
