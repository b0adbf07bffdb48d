"""A `RangeReader` over one registry blob: how the TOC and chunks are read without a download."""

from __future__ import annotations

from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference


class RegistryBlobReader:
    def __init__(self, client: RegistryClient, ref: ImageReference, digest: str, size: int) -> None:
        self._client = client
        self._ref = ref
        self._digest = digest
        self.size = size

    async def read_range(self, offset: int, length: int) -> bytes:
        return await self._client.read_range(self._ref, self._digest, offset, length)
