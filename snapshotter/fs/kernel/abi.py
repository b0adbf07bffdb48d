"""The FUSE kernel protocol's numbers and wire layouts (protocol 7.45), written from the kernel's
`include/uapi/linux/fuse.h`: opcodes, INIT flags (bits 32..63 travel in the `flags2` word),
open flags, device ioctls and the structs this session reads and writes, as `struct.Struct`s
(little-endian, the kernel's native order on the platforms peerpull runs on)."""

from __future__ import annotations

import enum
import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 45  # the newest minor this session knows; the kernel and we settle on the smaller
MIN_MINOR = 31  # max_pages, parallel dirops, readdirplus and 64-bit INIT flags are all older than this
ROOT_ID = 1
UNIQUE_RESEND = 1 << 63  # set in a resent request's unique id
MIN_READ_BUFFER = 8192


class Op(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


# requests that would change the filesystem: a read-only mount answers EROFS
WRITE_OPS = frozenset({Op.SETATTR, Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK,
                       Op.WRITE, Op.SETXATTR, Op.REMOVEXATTR, Op.CREATE, Op.FALLOCATE, Op.RENAME2, Op.TMPFILE,
                       Op.COPY_FILE_RANGE})
NO_REPLY_OPS = frozenset({Op.FORGET, Op.BATCH_FORGET})


class Notify(enum.IntEnum):
    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7


class InitFlag(enum.IntFlag):
    """INIT flags as one 64-bit word; the wire splits it into `flags` (low) and `flags2` (high)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30  # the reply carries flags2
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41


FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7


def _ioc(direction: int, nr: int, size: int) -> int:
    # Linux's generic _IOC encoding: dir(2 bits) size(14) type(8) nr(8); FUSE's type is 229
    return (direction << 30) | (size << 16) | (229 << 8) | nr


_IOC_WRITE, _IOC_READ = 1, 2
DEV_IOC_CLONE = _ioc(_IOC_READ, 0, 4)
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, 1, 16)  # struct fuse_backing_map
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, 2, 4)  # the backing id (u32)
PASSTHROUGH_STACK_DEPTH = 1  # backing files sit on a plain filesystem; overlayfs may stack once above us

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 and unused in 7.36+)
INIT_IN_FLAGS2 = struct.Struct("<I")
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # ... max_write time_gran max_pages map_alignment flags2 max_stack_depth
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime, their nsecs, mode nlink uid gid rdev blksize flags
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid entry_nsec attr_nsec
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
GETATTR_IN = struct.Struct("<IIQ")
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
RELEASE_IN = struct.Struct("<QIIQ")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETXATTR_IN = struct.Struct("<II")  # size padding (then the name, NUL-terminated)
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type (then the name, padded to 8 bytes)
BACKING_MAP = struct.Struct("<iIQ")  # fd flags padding
BACKING_ID = struct.Struct("<I")

assert INIT_OUT.size == 64 and ATTR.size == 88 and IN_HEADER.size == 40 and KSTATFS.size == 80
ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size  # 128
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size  # 104


def split_flags(flags: int) -> tuple[int, int]:
    """A 64-bit INIT flag word as the wire's (flags, flags2)."""
    return flags & 0xFFFFFFFF, flags >> 32


def dirent_size(name_len: int, plus: bool) -> int:
    raw = (ENTRY_OUT_SIZE if plus else 0) + DIRENT_HEAD.size + name_len
    return (raw + 7) & ~7
