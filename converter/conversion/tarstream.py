"""A streaming tar walker that hands back every byte it reads.

Written by hand because `tarfile` cannot do the one thing the converter needs: pass the source
stream through byte for byte while it parses. The seekable layer re-emits the source's exact tar
bytes (headers verbatim, content re-framed), so the layer's uncompressed digest (the config's
diff_id) does not change and containerd shares snapshots between the original and the converted
image. This module parses ustar, GNU (long names 'L'/'K', base-256 numbers) and PAX ('x' and
global 'g' headers, SCHILY/LIBARCHIVE xattrs) headers. GNU sparse files are refused.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import BinaryIO

from converter.format.errors import FormatError, UnsupportedError

BLOCK = 512

# typeflags (POSIX ustar + GNU); facts of the tar format.
REGULAR_TYPES = (b"0", b"\0", b"7")
HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
_ENTRY_TYPES = REGULAR_TYPES + (HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO)
_EXTENSION_TYPES = (PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK)
# An extension header's data is held in memory; a real one is a few KiB at most.
MAX_EXTENSION_BYTES = 1 << 20


@dataclass
class TarMember:
    """One tar entry after its extension headers have been applied."""

    raw_header: bytes  # every header block of this entry, extension blocks included, verbatim
    offset: int  # stream offset of the first header block
    typeflag: bytes
    name: str
    linkname: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: int
    mtime_nsec: int
    size: int  # content bytes that follow the header (before padding)
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_regular(self) -> bool:
        return self.typeflag in REGULAR_TYPES


def _parse_number(field_bytes: bytes, what: str, offset: int) -> int:
    if field_bytes and field_bytes[0] & 0x80:
        # base-256 (GNU): the other bits are a big-endian two's complement number
        value = int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
        if field_bytes[0] & 0x40:
            value -= 1 << (len(field_bytes) * 8 - 1)
        return value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise FormatError(f"tar header at offset {offset}: bad {what} field {text[:20]!r}") from None


def _parse_text(field_bytes: bytes, what: str, offset: int) -> str:
    raw = field_bytes.split(b"\0", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedError(f"tar header at offset {offset}: {what} is not UTF-8: {raw[:60]!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        expected = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if expected == unsigned:
        return True
    # some old writers summed signed chars
    high = sum(1 for b in block[:148] + block[156:] if b > 127)
    return expected == unsigned - 256 * high


def _parse_pax(data: bytes, offset: int) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # trailing NUL padding inside the declared size
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise FormatError(f"PAX header at offset {offset}: record without length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise FormatError(f"PAX header at offset {offset}: bad record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1 : end] != b"\n":
            raise FormatError(f"PAX header at offset {offset}: record overruns the header")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise FormatError(f"PAX header at offset {offset}: record without '='")
        records[key.decode("utf-8", "replace")] = value
        pos = end
    return records


def _decode_pax_text(value: bytes, key: str, offset: int) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedError(f"PAX header at offset {offset}: {key} is not UTF-8") from None


def _pax_number(value: bytes, key: str, offset: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise FormatError(f"PAX header at offset {offset}: bad {key} {value[:30]!r}") from None


def _pax_time(value: bytes, offset: int) -> tuple[int, int]:
    text = value.decode("ascii", "replace")
    whole, _, frac = text.partition(".")
    try:
        seconds = int(whole)
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except ValueError:
        raise FormatError(f"PAX header at offset {offset}: bad mtime {text[:30]!r}") from None
    if seconds < 0 and nsec:  # "-1.5" means 1.5 s before the epoch
        seconds, nsec = seconds - 1, 1_000_000_000 - nsec
    return seconds, nsec


class TarWalker:
    """Reads a tar stream entry by entry; every byte read is also returned to the caller.

    Use: `next_member()` → read exactly `member.size` bytes with `read_data()` → `padding()`
    gives the bytes between the content and the next header. After `next_member()` returns
    None, `read_trailer()` returns the end-of-archive blocks and anything after them.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.offset = 0
        self._remaining = 0  # content bytes of the current member not yet read
        self._pad = 0
        self._global_pax: dict[str, bytes] = {}
        self._pending_trailer = b""

    def _read_exact(self, n: int) -> bytes:
        parts = []
        left = n
        while left:
            piece = self._stream.read(left)
            if not piece:
                raise FormatError(f"tar stream truncated at offset {self.offset + n - left}")
            parts.append(piece)
            left -= len(piece)
        data = b"".join(parts) if len(parts) != 1 else parts[0]
        self.offset += n
        return data

    def next_member(self) -> TarMember | None:
        if self._remaining or self._pad:
            raise FormatError("tar walker: previous member not fully read")
        start = self.offset
        raw: list[bytes] = []
        local_pax: dict[str, bytes] = {}
        longname: str | None = None
        longlink: str | None = None
        while True:
            block = self._stream.read(BLOCK)
            if len(block) < BLOCK:
                # a stream that stops at a header boundary without end-of-archive blocks
                if not block and not raw:
                    return None
                more = block + self._stream.read(BLOCK - len(block)) if block else block
                if len(more) < BLOCK:
                    raise FormatError(f"tar stream truncated at offset {self.offset}")
                block = more
            self.offset += BLOCK
            if block == bytes(BLOCK):
                if raw:
                    raise FormatError(f"tar stream: extension header at offset {start} without an entry")
                self._pending_trailer = block
                return None
            if not _checksum_ok(block):
                raise FormatError(f"tar header checksum mismatch at offset {self.offset - BLOCK}")
            raw.append(block)
            typeflag = block[156:157]
            size = _parse_number(block[124:136], "size", self.offset)
            if typeflag in _EXTENSION_TYPES:
                if size > MAX_EXTENSION_BYTES:
                    raise FormatError(f"tar extension header at offset {self.offset} is {size} bytes")
                padded = self._read_exact((size + BLOCK - 1) // BLOCK * BLOCK)
                raw.append(padded)
                data = padded[:size]
                if typeflag == PAX_LOCAL:
                    local_pax.update(_parse_pax(data, self.offset))
                elif typeflag == PAX_GLOBAL:
                    self._global_pax.update(_parse_pax(data, self.offset))
                elif typeflag == GNU_LONGNAME:
                    longname = _parse_text(data, "GNU long name", self.offset)
                else:
                    longlink = _parse_text(data, "GNU long link", self.offset)
                continue
            if typeflag == GNU_SPARSE or any(k.startswith("GNU.sparse") for k in local_pax):
                raise UnsupportedError(f"tar entry at offset {start}: GNU sparse files are not supported")
            if typeflag not in _ENTRY_TYPES:
                raise UnsupportedError(f"tar entry at offset {start}: unsupported type {typeflag!r}")
            member = self._build(b"".join(raw), start, block, {**self._global_pax, **local_pax}, longname, longlink)
            self._remaining = member.size
            self._pad = -member.size % BLOCK
            return member

    def _build(
        self, raw: bytes, start: int, block: bytes, pax: dict[str, bytes], longname: str | None, longlink: str | None
    ) -> TarMember:
        off = start
        name = _parse_text(block[0:100], "name", off)
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field extends the name
            prefix = _parse_text(block[345:500], "prefix", off)
            if prefix:
                name = prefix + "/" + name
        typeflag = block[156:157]
        member = TarMember(
            raw_header=raw,
            offset=start,
            typeflag=typeflag,
            name=longname if longname is not None else name,
            linkname=longlink if longlink is not None else _parse_text(block[157:257], "link name", off),
            mode=_parse_number(block[100:108], "mode", off) & 0o7777,
            uid=_parse_number(block[108:116], "uid", off),
            gid=_parse_number(block[116:124], "gid", off),
            uname=_parse_text(block[265:297], "uname", off),
            gname=_parse_text(block[297:329], "gname", off),
            mtime=_parse_number(block[136:148], "mtime", off),
            mtime_nsec=0,
            size=_parse_number(block[124:136], "size", off),
            devmajor=_parse_number(block[329:337], "devmajor", off) if typeflag in (CHAR, BLOCKDEV) else 0,
            devminor=_parse_number(block[337:345], "devminor", off) if typeflag in (CHAR, BLOCKDEV) else 0,
        )
        for key, value in pax.items():
            if key == "path":
                member.name = _decode_pax_text(value, key, off)
            elif key == "linkpath":
                member.linkname = _decode_pax_text(value, key, off)
            elif key in ("uid", "gid", "size"):
                setattr(member, key, _pax_number(value, key, off))
            elif key in ("uname", "gname"):
                setattr(member, key, _decode_pax_text(value, key, off))
            elif key == "mtime":
                member.mtime, member.mtime_nsec = _pax_time(value, off)
            elif key.startswith("SCHILY.xattr."):
                member.xattrs[key[len("SCHILY.xattr.") :]] = value
            elif key.startswith("LIBARCHIVE.xattr."):
                try:
                    xname = base64.b64decode(key[len("LIBARCHIVE.xattr.") :] + "==").decode("utf-8")
                    member.xattrs.setdefault(xname, base64.b64decode(value + b"=="))
                except (ValueError, UnicodeDecodeError):
                    raise FormatError(f"PAX header at offset {off}: bad LIBARCHIVE xattr") from None
        if member.size < 0:
            raise FormatError(f"tar entry at offset {off}: negative size")
        if not member.is_regular:
            # Only regular files carry content; other types' size field is meaningless (as in tarfile).
            member.size = 0
        return member

    @property
    def saw_global_pax(self) -> bool:
        """Whether a PAX global header was read: it changes how every later member reads, so
        members must not move across it."""
        return bool(self._global_pax)

    def read_data(self, n: int) -> bytes:
        """Read up to `n` content bytes of the current member (exactly `n` unless fewer remain)."""
        n = min(n, self._remaining)
        data = self._read_exact(n) if n else b""
        self._remaining -= n
        return data

    def padding(self) -> bytes:
        """The zero bytes that round the current member's content up to a block."""
        if self._remaining:
            raise FormatError("tar walker: member content not fully read")
        pad, self._pad = self._pad, 0
        return self._read_exact(pad) if pad else b""

    def read_trailer(self, n: int) -> bytes:
        """After the last member: up to `n` bytes of end-of-archive blocks and trailing data."""
        head, self._pending_trailer = self._pending_trailer, b""
        if len(head) >= n:
            return head
        rest = self._stream.read(n - len(head)) or b""
        self.offset += len(rest)
        return head + rest
