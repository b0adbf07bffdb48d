"""FUSE passthrough for complete files, on a real mount served by the kernel transport: a file whose
every chunk is in the node's cache is materialised into the object store and its later opens read
without a single READ reaching the daemon (mmap too); eviction never removes an open file and new
opens never see EIO; an inode open through READ stays so (and correct) while it becomes complete;
a successor's tracker reuses the backing ids; a store on overlayfs stops the daemon with one line.

The layer's chunks are real zstd frames verified by the real fetcher into a real disk cache; only
the origin is local (`LocalOrigin`, frames from memory), so a test decides what is cached."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from converter.format import toc as fmt
from peer.cache import ChunkCache
from peer.chunk import ChunkRef
from peer.fetcher import ChunkFetcher
from peer.metrics import PeerMetrics
from peerpull.testbed.daemon import EmbeddedDaemon
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.kernel.session import KernelSession
from snapshotter.fs.mount import KernelMount, mounted_at
from snapshotter.fs.objects import ObjectStore
from snapshotter.fs.passthrough import Backing, OpenFiles, Passthrough
from tests.support.cli import assert_one_line_error, peerpull_cmd
from tests.support.kernel_fuse import in_thread, until

pytestmark = pytest.mark.root

MIB = 1 << 20
LAYER = "sha256:" + "5e" * 32
LAYER_DIR = LAYER.split(":", 1)[1]
rng = random.Random(11)
FILES = {  # name → content: 1 MiB chunks; "small" is below passthrough_min_bytes
    "big": rng.randbytes(6 * MIB + 12345),
    "lazy": rng.randbytes(3 * MIB + 77),
    "small": rng.randbytes(200_000),
}


class LocalOrigin:
    """The origin tier from memory (the registry is not what these tests are about); counts fetches."""

    def __init__(self, frames: dict[str, bytes]) -> None:
        self.frames = frames
        self.calls = 0

    async def fetch_frame(self, ref: ChunkRef, background: bool = False) -> bytes:
        self.calls += 1
        return self.frames[ref.digest]


def build_layer() -> tuple[fmt.Toc, dict[str, bytes]]:
    cctx = zstandard.ZstdCompressor(write_checksum=True, write_content_size=True)
    entries = [fmt.TocEntry(path=".", type=fmt.DIR, mode=0o755)]
    frames: dict[str, bytes] = {}
    offset = 0
    for name, data in FILES.items():
        chunks = []
        for at in range(0, len(data), MIB):
            piece = data[at:at + MIB]
            frame = cctx.compress(piece)
            chunk = fmt.Chunk(at, len(piece), offset, len(frame), hashlib.sha256(piece).digest())
            frames[chunk.digest_hex] = frame
            chunks.append(chunk)
            offset += len(frame)
        entries.append(fmt.TocEntry(path=name, type=fmt.FILE, mode=0o644, size=len(data), chunks=chunks))
    return fmt.Toc(MIB, entries), frames


@dataclass
class Node:
    fs: LayerFS
    fetcher: ChunkFetcher
    origin: LocalOrigin
    passthrough: Passthrough
    store: ObjectStore
    mount: KernelMount
    point: Path

    @property
    def session(self) -> KernelSession:
        assert self.mount.session is not None
        return self.mount.session

    def path(self, name: str) -> Path:
        return self.point / LAYER_DIR / name

    async def cache(self, name: str) -> None:
        """Every chunk of `name` fetched and verified into the disk cache."""
        layer, node = self.fs._node(self.ino(name))
        for chunk in node.chunks:
            await self.fetcher.get(layer.source.ref(chunk))
        await self.fetcher.flush()

    def ino(self, name: str) -> int:
        layer = next(iter(self.fs._by_slot.values()))
        return layer.tree.root.children[name.encode()].ino  # type: ignore[index]


def new_fs(root: Path, fetcher: ChunkFetcher, cache: ChunkCache, toc: fmt.Toc) -> tuple[LayerFS, Passthrough]:
    store = ObjectStore(root / "objects", 64 * MIB)
    passthrough = Passthrough(store, cache.known, fetcher, MIB)
    fs = LayerFS(FileReader(fetcher, 16 * MIB, "sequential", 4), passthrough=passthrough)
    fs.add_layer(LAYER, 3, "example/repo", toc)
    return fs, passthrough


@contextlib.asynccontextmanager
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing")
    toc, frames = build_layer()
    origin = LocalOrigin(frames)
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    fetcher = ChunkFetcher(cache, origin, PeerMetrics())
    fs, passthrough = new_fs(tmp_path, fetcher, cache, toc)
    point = tmp_path / "mnt"
    point.mkdir()
    mount = KernelMount(fs, point, 64, 1024)
    mount.open()
    serving = asyncio.create_task(mount.serve())
    try:
        assert mount.session is not None
        if not mount.session.passthrough:
            pytest.fail("this kernel did not offer FUSE passthrough (6.9+): the passthrough tests need it")
        yield Node(fs, fetcher, origin, passthrough, passthrough.store, mount, point)
    finally:
        await mount.stop(serving)
        mount.close()
        await passthrough.close()
        await fetcher.cancel_fetches()
        fetcher.close()
        cache.close()
        assert mounted_at(point) is None


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_and_map(path: Path) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        data = f.read()
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            return data, bytes(mapped)


async def released(n: Node) -> None:
    await until(lambda: n.session.handles() == {})


async def test_a_complete_file_opened_again_reads_without_any_read_request(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.cache("big")
        await n.cache("small")
        # the first open finds it complete but not yet in the store: served through READ, copied meanwhile
        assert await in_thread(read_file, n.path("big")) == FILES["big"]
        await until(lambda: n.passthrough.materialised == 1)
        assert (n.store.root / n.store.keys()[0]).read_bytes() == FILES["big"]
        await released(n)
        before = n.session.reads
        assert await in_thread(read_and_map, n.path("big")) == (FILES["big"], FILES["big"])
        held = await in_thread(open, n.path("big"), "rb")
        count, backing_id = n.session.handles()[n.ino("big")]
        assert count == 1 and backing_id > 0
        assert await in_thread(os.pread, held.fileno(), 4096, 5 * MIB + 3) == FILES["big"][5 * MIB + 3:5 * MIB + 4099]
        await in_thread(held.close)
        assert n.session.reads == before  # not one READ reached the daemon
        # a small file gains nothing: never copied, always served through READ
        small = await in_thread(open, n.path("small"), "rb")
        assert n.session.handles()[n.ino("small")] == (1, 0)
        assert await in_thread(small.read) == FILES["small"]
        await in_thread(small.close)
        assert n.session.reads > before and len(n.store.keys()) == 1


async def test_a_file_read_to_its_end_is_native_at_its_next_open(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        # nothing cached: a sequential reader fetches it through the daemon (and its rest ahead)
        assert await in_thread(read_file, n.path("lazy")) == FILES["lazy"]
        assert n.origin.calls >= 4
        await until(lambda: n.passthrough.materialised == 1)  # its last read reached the end: copied
        await released(n)
        before = n.session.reads
        assert await in_thread(read_and_map, n.path("lazy")) == (FILES["lazy"], FILES["lazy"])
        assert n.session.reads == before


def read_tail_then_head(path: Path, tail: int) -> bytes:
    """The end of the file first (as parallel readahead can answer it), then the rest from the start."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        end = os.pread(f.fileno(), tail, size - tail)
        return os.pread(f.fileno(), size - tail, 0) + end


async def test_a_file_whose_end_was_read_before_its_start_is_native_once_complete(tmp_path: Path) -> None:
    """The READ at the end is answered while the file is not complete: the reads that complete it
    later still make the next open native."""
    async with node(tmp_path) as n:
        assert await in_thread(read_tail_then_head, n.path("lazy"), 4096) == FILES["lazy"]
        await until(lambda: n.passthrough.materialised == 1)
        await released(n)
        before = n.session.reads
        assert await in_thread(read_file, n.path("lazy")) == FILES["lazy"]
        assert n.session.reads == before


async def test_eviction_with_the_file_open_keeps_it_and_new_opens_never_fail(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.cache("big")
        await in_thread(read_file, n.path("big"))
        await until(lambda: n.passthrough.materialised == 1)
        await released(n)
        (key,) = n.store.keys()
        first = await in_thread(open, n.path("big"), "rb")
        ino = n.ino("big")
        backing_id = n.session.handles()[ino][1]
        assert backing_id > 0 and n.store.pinned(key) == 1
        assert n.store.evict_to(0) == []  # open: kept
        assert (n.store.root / key).exists()
        # a second open while the first is held reuses the id (a new one would make opens fail with EIO)
        second = await in_thread(open, n.path("big"), "rb")
        assert n.session.handles()[ino] == (2, backing_id)
        assert await in_thread(second.read) == FILES["big"]
        await in_thread(second.close)
        assert await in_thread(first.read) == FILES["big"]
        await in_thread(first.close)
        await released(n)  # the last release closed the id and unpinned the object
        assert n.store.pinned(key) == 0
        assert n.store.evict_to(0) == [key] and not (n.store.root / key).exists()
        # after eviction a new open is served through READ (no EIO), and the file is copied again
        assert await in_thread(read_file, n.path("big")) == FILES["big"]
        await until(lambda: n.passthrough.materialised == 2)
        await released(n)
        before = n.session.reads
        assert await in_thread(read_file, n.path("big")) == FILES["big"]
        assert n.session.reads == before


async def test_a_file_open_through_read_stays_correct_when_it_becomes_complete(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        ino = n.ino("lazy")
        first = await in_thread(open, n.path("lazy"), "rb", 0)
        assert await in_thread(first.read, 4096) == FILES["lazy"][:4096]
        assert n.session.handles()[ino] == (1, 0)
        await n.cache("lazy")  # the rest arrives (another reader, the stream) while it is open
        await in_thread(read_file, n.path("lazy"))
        await until(lambda: n.passthrough.materialised == 1)
        # complete and in the store, but open through READ: a new open is answered the same way
        second = await in_thread(open, n.path("lazy"), "rb")
        assert n.session.handles()[ino] == (2, 0)
        assert await in_thread(second.read) == FILES["lazy"]
        await in_thread(second.close)
        assert await in_thread(first.read) == FILES["lazy"][4096:]
        assert await in_thread(os.pread, first.fileno(), 100, 2 * MIB) == FILES["lazy"][2 * MIB:2 * MIB + 100]
        await in_thread(first.close)
        await released(n)
        third = await in_thread(open, n.path("lazy"), "rb")  # every open closed: now it is native
        assert n.session.handles()[ino][1] > 0
        assert await in_thread(third.read) == FILES["lazy"]
        await in_thread(third.close)


async def test_a_successor_adopting_the_exported_table_reuses_the_backing_ids(tmp_path: Path) -> None:
    async with node(tmp_path) as n:
        await n.cache("big")
        await in_thread(read_file, n.path("big"))
        await until(lambda: n.passthrough.materialised == 1)
        await released(n)
        held = await in_thread(open, n.path("big"), "rb")
        ino = n.ino("big")
        backing_id = n.session.handles()[ino][1]
        assert backing_id > 0
        state = n.session.open_files.export_state()
        assert state == {"files": [[ino, 1, backing_id, n.store.keys()[0]]]}
        # a successor (its own store over the same directory, as a new process would have) serves
        # the connection without INIT and takes the table over
        first = n.session
        first.stop()
        await asyncio.sleep(0)
        cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
        fs, passthrough = new_fs(tmp_path, n.fetcher, cache, build_layer()[0])
        second = KernelSession.resume(fs, first.fd, first.init_state(), lookups=first.lookups())
        second.open_files.adopt_state(state)
        assert second.handles() == {ino: (1, backing_id)} and passthrough.store.pinned(state["files"][0][3]) == 1
        serving = asyncio.create_task(second.serve())
        try:
            again = await in_thread(open, n.path("big"), "rb")
            assert second.handles() == {ino: (2, backing_id)}  # the same id: no EIO for later opens
            assert await in_thread(again.read) == FILES["big"] and await in_thread(held.read) == FILES["big"]
            await in_thread(again.close)
            await in_thread(held.close)
            await until(lambda: second.handles() == {})
            assert second.reads == 0 and passthrough.store.pinned(state["files"][0][3]) == 0
            reopened = await in_thread(open, n.path("big"), "rb")  # a fresh id, registered by the successor
            assert second.handles()[ino][1] > 0
            await in_thread(reopened.close)
        finally:
            second.stop()
            await serving
            cache.close()
        n.mount.session = second  # the fixture unmounts through the successor's connection


def test_adopted_state_is_reused_without_registering_again(tmp_path: Path) -> None:
    registered: list[int] = []
    closed: list[int] = []
    (tmp_path / "backing").write_bytes(b"x")
    old = OpenFiles(lambda fd: 41, closed.append)
    assert old.open(8, lambda: Backing("", tmp_path / "backing")) == 41

    def register(fd: int) -> int:
        registered.append(fd)
        return 99

    new = OpenFiles(register, closed.append)
    new.adopt_state(old.export_state())
    assert new.open(8, lambda: pytest.fail("the inode's first open decided already")) == 41
    assert registered == [] and new.handles() == {8: (2, 41)}
    new.release(8)
    assert closed == []  # one open is left
    new.release(8)
    # closed, but the id stays registered: the kernel may still hold a file of the inode
    assert closed == [] and new.handles() == {} and new.export_state()["files"] == [[8, 0, 41, ""]]
    new.drop("")  # its object is about to be evicted
    assert closed == [41] and new.export_state()["files"] == []


def test_a_backing_id_is_kept_across_opens_and_the_holder_learns_each_change(tmp_path: Path) -> None:
    """An inode keeps one backing id from its first passthrough open until its object is evicted;
    each registration and each close is reported (the fd holder must know every id before an OPEN
    is answered with it)."""
    (tmp_path / "backing").write_bytes(b"x")
    ids = iter([41, 42])
    closed: list[int] = []
    changes: list[list[list[object]]] = []
    files = OpenFiles(lambda fd: next(ids), closed.append)
    files.on_change = lambda: changes.append(files.export_state()["files"])
    backing = lambda: Backing("", tmp_path / "backing")  # noqa: E731
    assert files.open(8, backing) == 41
    assert changes == [[[8, 1, 41, ""]]]  # known before the open is answered
    files.release(8)
    assert files.open(8, lambda: pytest.fail("the kept id answers")) == 41  # no second id
    files.release(8)
    assert files.holds("") is False and len(changes) == 1
    files.drop("")
    assert closed == [41] and changes[-1] == []
    assert files.open(8, backing) == 42  # after eviction a new id: none of the old one is left


def test_a_store_on_overlayfs_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}",
                    str(dirs["merged"])], check=True)
    try:
        env = {**os.environ, "PEERPULL_SNAPSHOTTER_OBJECT_STORE_DIR": str(dirs["merged"] / "objects")}
        result = peerpull_cmd("daemon", "--root", str(tmp_path / "root"), "--socket", str(tmp_path / "s.sock"),
                              "--cache-dir", str(tmp_path / "cache"), "--listen", "127.0.0.1:0", env=env)
        err = assert_one_line_error(result, 2, "is on overlayfs")
        assert "snapshotter.object_store_dir" in err.message
    finally:
        subprocess.run(["umount", str(dirs["merged"])], check=True)


def test_the_fuse_reads_bench_reports_its_figures_into_coldstart(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import coldstart_bench
    import fuse_reads

    reads = fuse_reads.measure(tmp_path / "work", mib=8, random_reads=200, rounds=1)
    assert reads["passthrough_read_requests"] == 0  # passthrough reads never reached the daemon
    assert reads["python_cpu_us_per_read"] is not None  # the Python-served ones did
    figures = coldstart_bench.summarize([{"lazy_ready_s": 1.0}], label="x", image_bytes=1, link="tbf", rtt_ms=0.0, rtt_measured_ms=None,
                                        chunks=1, rate=1e8, reads=reads)
    for key in ("fuse_random_iops", "disk_random_iops", "fuse_seq_mb_s", "disk_seq_mb_s"):
        assert figures[key] == reads[key] and figures[key] > 0
    assert "passthrough vs disk" in coldstart_bench.table(figures)


@pytest.mark.parametrize("backend", ["kernel", "pyfuse3"])
def test_the_daemon_says_at_start_whether_opens_get_passthrough(tmp_path: Path, backend: str) -> None:
    env = {"PEERPULL_SNAPSHOTTER_FUSE_BACKEND": backend}
    with EmbeddedDaemon(tmp_path / "d", extra_env=env) as daemon:
        (said,) = daemon.events("fuse_passthrough")
    if backend == "kernel":
        assert said["enabled"] is True and said["store"] == str(tmp_path / "d" / "snapshotter" / "objects")
    else:
        assert said["enabled"] is False and "pyfuse3" in said["reason"]


async def test_an_inode_number_reused_by_another_layer_never_gets_the_old_object(tmp_path: Path) -> None:
    toc, frames = build_layer()
    cache = ChunkCache(str(tmp_path / "cache"), 1 << 30)
    fetcher = ChunkFetcher(cache, LocalOrigin(frames), PeerMetrics())
    try:
        fs, passthrough = new_fs(tmp_path, fetcher, cache, toc)
        layer = next(iter(fs._by_slot.values()))
        big = layer.tree.root.children[b"big"]  # type: ignore[index]
        path = await passthrough.materialise(layer.source, big.ino, big.size, big.chunks)
        assert fs.backing_file(big.ino) == Backing(path.name, path)
        # the layer goes; another one gets its slot, and with it the same inode number for another file
        fs.remove_layer(LAYER)
        lazy = next(e for e in toc.entries if e.path == "lazy")
        renamed = fmt.TocEntry(path="big", type=fmt.FILE, mode=0o644, size=lazy.size, chunks=lazy.chunks)
        other = fmt.Toc(MIB, [renamed if e.path == "big" else e for e in toc.entries])
        fs.add_layer("sha256:" + "6e" * 32, 3, "example/repo", other)
        reused = next(iter(fs._by_slot.values())).tree.root.children[b"big"]  # type: ignore[index]
        assert reused.ino == big.ino and reused.size != big.size
        assert fs.backing_file(reused.ino) is None  # not the old file's object; this one is not cached
    finally:
        await fetcher.cancel_fetches()
        fetcher.close()
        cache.close()
