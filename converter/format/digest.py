"""Digest helpers shared by every package: parsing, validation and streaming sha256."""

from __future__ import annotations

import hashlib
import re

from converter.format.errors import DigestMismatchError, FormatError

SHA256_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """True when `value` is a well-formed `sha256:<64 lowercase hex>` digest."""
    # fullmatch: `$` would also accept a trailing newline
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def parse_digest(value: str) -> str:
    """Return `value` if it is a well-formed sha256 digest, else raise `FormatError`."""
    if not is_digest(value):
        raise FormatError(f"not a sha256 digest: {value[:80]!r}")
    return value


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """The OCI digest string of `data`."""
    return SHA256_PREFIX + hashlib.sha256(data).hexdigest()


def raw_to_digest(raw: bytes) -> str:
    """Turn the 32 raw bytes stored in a TOC into an OCI digest string."""
    if len(raw) != 32:
        raise FormatError(f"a sha256 digest has 32 bytes, got {len(raw)}")
    return SHA256_PREFIX + raw.hex()


def digest_to_raw(digest: str) -> bytes:
    """The 32 raw bytes of a `sha256:` digest string."""
    return bytes.fromhex(parse_digest(digest)[len(SHA256_PREFIX):])


def verify_bytes(data: bytes | bytearray | memoryview, expected: str, what: str) -> None:
    """Raise `DigestMismatchError` naming `what` unless `data` hashes to `expected`."""
    actual = sha256_digest(data)
    if actual != expected:
        raise DigestMismatchError(f"{what}: digest mismatch (expected {expected}, got {actual})")


class DigestWriter:
    """Counts and hashes bytes as they stream past, so no second pass is needed."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return SHA256_PREFIX + self._hash.hexdigest()
