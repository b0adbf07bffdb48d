"""Startup-first layout (`peerpull convert --profile`): the reordered layer unpacks to the same tree,
its startup files fill the first frames, it is deterministic; profiles from a file, from the
registry and learnt by running the image; stale and foreign profiles ignored."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.conversion.convert import frame_spread
from converter.conversion.layer_writer import write_seekable_layer
from converter.conversion.layout import LayoutPlan, SegmentReader, plan_layout
from converter.format import toc as fmt
from converter.format.digest import sha256_digest
from converter.format.layer_reader import FileRangeReader, read_toc
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference
from peerpull.commands.convert_profile import push_profile
from snapshotter.service import profiles as pf
from snapshotter.service.profiles_source import registry_profile
from tests.support import images
from tests.support.containerd import ContainerdProcess, pull_image, run_container
from tests.support.image_fixtures import push_layout
from tests.support.images import CHUNK, DEEP_FILE, ENTRYPOINT_OUTPUT
from tests.support.lazy_stack import LazyStack
from tests.support.tree import container_tree, expected_tree_from_layers
from tests.test_convert import fetch_image, peerpull

SMALL = fmt.pack_threshold(CHUNK)


def _toc(blob: bytes, tmp_path: Path) -> fmt.Toc:
    path = tmp_path / f"{sha256_digest(blob)[7:19]}.blob"
    path.write_bytes(blob)
    return asyncio.run(read_toc(FileRangeReader(path)))[1]


def _untar(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def _lay_out(tar: bytes, startup: list[str], workers: int = 2) -> tuple[bytes, LayoutPlan]:
    spool = io.BytesIO(tar)
    plan = plan_layout(spool, startup, SMALL)
    out = io.BytesIO()
    write_seekable_layer(SegmentReader(spool, plan.segments), out, chunk_size=CHUNK, workers=workers)  # type: ignore[arg-type]
    return out.getvalue(), plan


def _plain(tar: bytes) -> bytes:
    out = io.BytesIO()
    write_seekable_layer(io.BytesIO(tar), out, chunk_size=CHUNK)  # type: ignore[arg-type]
    return out.getvalue()


def _members(tar: bytes) -> list[tarfile.TarInfo]:
    return tarfile.open(fileobj=io.BytesIO(tar)).getmembers()


def _regular_files(tar: bytes) -> list[str]:
    return [fmt.normalize_path(m.name) for m in _members(tar) if m.isreg() and "/.wh." not in f"/{m.name}"]


def _startup_frames(toc: fmt.Toc, paths: list[str]) -> list[int]:
    wanted = set(paths)
    return [c.blob_offset for e in toc.entries if e.path in wanted for c in e.chunks]


def _check_tar_order(tar: bytes) -> None:
    """Every listed directory precedes what it contains; every hardlink follows its target."""
    seen: set[str] = set()
    members = _members(tar)
    dirs = {fmt.normalize_path(m.name) for m in members if m.isdir()}
    for m in members:
        path = fmt.normalize_path(m.name)
        parent = os.path.dirname(path)
        while parent:
            assert parent not in dirs or parent in seen, f"{path} before its directory {parent}"
            parent = os.path.dirname(parent)
        if m.islnk():
            assert fmt.normalize_path(m.linkname) in seen, f"hardlink {path} before its target"
        seen.add(path)


# ---- the layout itself (no registry) ---------------------------------------------------------

def test_corner_case_layers_laid_out_unpack_to_the_same_tree(tmp_path: Path) -> None:
    tars = images.corner_case_layer_tars(CHUNK)
    new_tars, plans = [], []
    for tar in tars:
        startup = _regular_files(tar)[::-1] + ["not/in/the/layer"]
        blob, plan = _lay_out(tar, startup)
        new_tars.append(_untar(blob))
        plans.append(plan)
        _check_tar_order(new_tars[-1])
        # the same members, only in another order
        assert sorted(m.name for m in _members(new_tars[-1])) == sorted(m.name for m in _members(tar))
        contents = {m.name: m.get_info() for m in _members(tar)}
        assert {m.name: m.get_info() for m in _members(new_tars[-1])} == contents
    assert expected_tree_from_layers(new_tars) == expected_tree_from_layers(tars)
    base, gnu, third = plans
    assert base.moved and base.refused["not/in/the/layer"] == "not in this layer"
    # hardlink targets move (their links follow); what a whiteout of the layer names does not
    assert "hardlinks/orig" in base.moved and "files/text.txt" in base.moved
    assert "opaque/new" in gnu.moved
    assert not third.moved and set(third.refused.values()) == {"the layer has a PAX global header"}
    assert new_tars[2] == tars[2]


def test_duplicates_whiteout_targets_and_odd_ancestors_stay_in_place() -> None:
    layer = images.LayerBuilder()
    layer.dir(".")
    layer.dir("a")
    layer.file("a/dup", b"first")
    layer.file("a/dup", b"second")  # the later one wins: the pair keeps its order
    layer.whiteout("b/gone")
    layer.dir("b")
    layer.file("b/gone", b"re-added and whited out")  # contradictory, so left alone
    layer.symlink("c", "a")
    layer.file("c/through-link", b"under a symlink ancestor")
    layer.file("plain", b"moves")
    tar = layer.tar_bytes()
    blob, plan = _lay_out(tar, ["a/dup", "b/gone", "c/through-link", "plain"])
    assert plan.moved == ["plain"]
    assert [m.name for m in _members(_untar(blob))][:2] == [".", "plain"]  # the root's entry stays first
    assert plan.refused == {
        "a/dup": "the layer lists this path more than once",
        "b/gone": "a whiteout of this layer removes b/gone",
        "c/through-link": "its ancestor c is not listed once as a directory",
    }


def _scattered_layer(seed: int = 7) -> tuple[bytes, list[str]]:
    """300 small files and a few large ones over 10 directories; every 9th is a startup file,
    listed in a shuffled (first-read) order, with one large file among them."""
    rnd = random.Random(seed)
    layer = images.LayerBuilder()
    startup = []
    for d in range(10):
        layer.dir(f"pkg{d}")
        for i in range(30):
            path = f"pkg{d}/mod{i:02d}.py"
            layer.file(path, rnd.randbytes(rnd.randint(1, SMALL - 1)))
            if (d * 30 + i) % 9 == 0:
                startup.append(path)
        layer.file(f"pkg{d}/big.so", rnd.randbytes(3 * CHUNK + 11))
    rnd.shuffle(startup)
    return layer.tar_bytes(), startup + ["pkg5/big.so"]


def test_startup_files_fill_the_first_frames_in_profile_order(tmp_path: Path) -> None:
    tar, startup = _scattered_layer()
    before = _toc(_plain(tar), tmp_path)
    blob, plan = _lay_out(tar, startup)
    after = _toc(blob, tmp_path)
    assert plan.moved == startup and not plan.refused  # small ones in order, then the large one
    frames, span, _ = frame_spread(after, _startup_frames(after, startup))
    frame_offsets = sorted({c.blob_offset for e in after.entries for c in e.chunks})
    assert span == frames and min(_startup_frames(after, startup)) == frame_offsets[0]  # one run, at the front
    small_bytes = sum(-(-e.size // 512) * 512 + 1024 for e in after.entries if e.path in startup[:-1])
    packed_at_most = -(-small_bytes // (CHUNK - SMALL)) + 1  # a frame is filled to at least chunk - threshold
    assert frames <= packed_at_most + 4  # + the large file's 4 chunks
    frames_before, span_before, _ = frame_spread(before, _startup_frames(before, startup))
    assert frames < frames_before and span < span_before
    files_in_order = [e.path for e in after.entries if e.path in set(startup)]
    assert files_in_order == startup


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3 * CHUNK), min_size=1, max_size=25), st.integers(0, 2**32), st.sampled_from([1, 2]))
def test_layout_round_trip_for_any_sizes_and_startup_sets(sizes: list[int], seed: int, version: int) -> None:
    rnd = random.Random(seed)
    layer = images.LayerBuilder()
    paths = []
    for i, size in enumerate(sizes):
        if i % 4 == 0:
            layer.dir(f"d{i}")
        path = f"d{i - i % 4}/f{i}"
        layer.file(path, rnd.randbytes(size))
        paths.append(path)
        if i % 5 == 2:
            layer.hardlink(f"d{i - i % 4}/link{i}", path)
    tar = layer.tar_bytes()
    startup = rnd.sample(paths, rnd.randint(0, len(paths)))
    spool = io.BytesIO(tar)
    plan = plan_layout(spool, startup, SMALL if version == 2 else 0)
    out = io.BytesIO()
    write_seekable_layer(SegmentReader(spool, plan.segments), out, chunk_size=CHUNK, format_version=version)  # type: ignore[arg-type]
    new = _untar(out.getvalue())
    _check_tar_order(new)
    assert {m.name: m.get_info() for m in _members(new)} == {m.name: m.get_info() for m in _members(tar)}
    assert expected_tree_from_layers([new]) == expected_tree_from_layers([tar])
    assert sorted(plan.moved) == sorted(startup)


def test_layout_is_deterministic_and_no_startup_files_is_todays_layer() -> None:
    tar, startup = _scattered_layer()
    first, _ = _lay_out(tar, startup, workers=1)
    again, _ = _lay_out(tar, startup, workers=4)
    assert first == again
    unchanged, plan = _lay_out(tar, [])
    assert not plan.moved and unchanged == _plain(tar)


# ---- through the registry --------------------------------------------------------------------

def _image_toc(ref: str, index: int) -> tuple[dict, fmt.Toc]:
    from converter.format.layer_reader import location_from_annotations, read_toc_frame
    from converter.registry.blob_reader import RegistryBlobReader

    async def read() -> tuple[dict, fmt.Toc]:
        reference = ImageReference.parse(ref)
        async with RegistryClient(RegistryConfig()) as client:
            fetched, _ = await client.resolve_image(reference)
            desc = json.loads(fetched.body)["layers"][index]
            location = location_from_annotations(desc["annotations"])
            assert location is not None
            footer, frame = await read_toc_frame(RegistryBlobReader(client, reference, desc["digest"], desc["size"]),
                                                 location)
            return {"digest": fetched.digest, "layer": desc["digest"]}, fmt.decode_toc(frame, footer)

    return asyncio.run(read())


STARTUP = [DEEP_FILE, "files/text.txt", "ünïcødé/🚀 emoji ✨.bin", "hardlinks/orig", "victims/keep",
           "files/random-2.5M", "dirs/mode-0555/inside"]


@pytest.fixture(scope="module")
def corner(registry_session, corner_case_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The corner-case image, converted plainly, a profile of that conversion (base layer files read
    last to first) pushed next to it, and that profile as `peerpull profile show --json` gives it."""
    source = push_layout(corner_case_layout, registry_session.address, "profiled/original")
    plain = f"{registry_session.address}/profiled/plain:1"
    report = json.loads(peerpull("convert", source, plain, "--chunk-size", str(CHUNK), "--json", "-", "--quiet").stdout)
    facts, toc = _image_toc(plain, 0)
    reads = [(facts["layer"], o) for o in _startup_frames(toc, STARTUP[::-1])]
    profile = pf.StartupProfile(facts["digest"], tuple(dict.fromkeys(reads)))

    async def push() -> None:
        async with RegistryClient(RegistryConfig()) as client:
            await push_profile(client, ImageReference.parse(plain), profile)

    asyncio.run(push())
    path = tmp_path_factory.mktemp("profile") / "startup.json"
    path.write_text(peerpull("profile", "show", "--json", plain).stdout)
    return {"source": source, "plain": plain, "plain_manifest": report["manifest_digest"], "profile": str(path),
            "registry": registry_session.address}


def test_profile_file_end_to_end(corner: dict[str, str]) -> None:
    target = f"{corner['registry']}/profiled/fast:1"
    out = peerpull("convert", corner["source"], target, "--chunk-size", str(CHUNK), "--profile", corner["profile"],
                   "--json", "-", "--quiet")
    report = json.loads(out.stdout)
    layout = report["layout"]
    assert layout is not None, out.stderr
    assert layout["moved_files"] >= len(STARTUP) and layout["layers"] == 1 and layout["stale_entries"] == 0
    assert layout["span_after"] == layout["frames_after"] <= layout["frames_before"] < layout["span_before"]
    assert layout["runs_after"] == 1 < layout["runs_before"]
    assert report["manifest_digest"] != corner["plain_manifest"]
    # the config names the new layer's diff_id; the others are as before
    manifest, config, blobs = asyncio.run(fetch_image(target))
    assert config["rootfs"]["diff_ids"] == [sha256_digest(_untar(blobs[d["digest"]])) for d in manifest["layers"]]
    _, _, plain_blobs = asyncio.run(fetch_image(corner["plain"]))
    assert [d["digest"] in plain_blobs for d in manifest["layers"]] == [False, True, True]
    # the pushed profile names the startup files' frames of the new layer: the first ones, one run
    facts, toc = _image_toc(target, 0)

    async def profile() -> pf.StartupProfile | None:
        async with RegistryClient(RegistryConfig()) as client:
            return await registry_profile(client, target, facts["digest"])

    pushed = asyncio.run(profile())
    assert pushed is not None and {blob for blob, _ in pushed.reads} == {facts["layer"]}
    offsets = [o for _, o in pushed.reads]
    assert set(_startup_frames(toc, STARTUP)) <= set(offsets)  # and those of files that shared their frames
    count, span, _ = frame_spread(toc, offsets)
    assert count == span == layout["frames_after"]


def test_laid_out_image_runs_on_plain_containerd_with_the_same_tree(
        containerd: ContainerdProcess, corner: dict[str, str]) -> None:
    target = f"{corner['registry']}/profiled/plain-ctr:1"
    peerpull("convert", corner["source"], target, "--chunk-size", str(CHUNK), "--profile", corner["profile"], "--quiet")
    for ref in (corner["source"], target):
        pull_image(containerd, ref)
    assert container_tree(containerd, target) == container_tree(containerd, corner["source"])
    assert ENTRYPOINT_OUTPUT in run_container(containerd, target, [])


def test_foreign_and_stale_profiles_are_ignored_with_one_warning(corner: dict[str, str], tmp_path: Path) -> None:
    facts, _ = _image_toc(corner["plain"], 0)
    foreign = tmp_path / "foreign.json"
    foreign.write_bytes(pf.encode(pf.StartupProfile("sha256:" + "ab" * 32, ((facts["layer"], 0),))))
    stale = tmp_path / "stale.json"
    offsets = pf.StartupProfile(facts["digest"], ((facts["layer"], 1), (facts["layer"], 3)))  # no frame starts there
    stale.write_text(json.dumps({"image": corner["plain"], "profile": json.loads(pf.encode(offsets))}))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for path, why in ((foreign, "is for manifest"), (stale, "names no frame"), (broken, "not JSON")):
        target = f"{corner['registry']}/profiled/ignored-{path.stem}:1"
        out = peerpull("convert", corner["source"], target, "--chunk-size", str(CHUNK), "--profile", str(path),
                       "--json", "-", "--quiet")
        warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and why in warnings[0] and "startup profile ignored" in warnings[0], out.stderr
        report = json.loads(out.stdout)
        assert report["layout"] is None and report["manifest_digest"] == corner["plain_manifest"]


def test_profile_from_the_registry(corner: dict[str, str]) -> None:
    """The profile a node pushed for the seekable twin at DST lays out the next conversion to DST."""
    twin = f"{corner['registry']}/profiled/twin:1"
    peerpull("convert", corner["source"], twin, "--chunk-size", str(CHUNK), "--quiet")
    profile = pf.decode(json.dumps(json.loads(Path(corner["profile"]).read_text())["profile"]).encode())

    async def push() -> None:
        async with RegistryClient(RegistryConfig()) as client:
            await push_profile(client, ImageReference.parse(twin), profile)

    asyncio.run(push())
    out = peerpull("convert", corner["source"], twin, "--chunk-size", str(CHUNK), "--profile", "registry",
                   "--json", "-", "--quiet")
    layout = json.loads(out.stdout)["layout"]
    assert layout["moved_files"] >= len(STARTUP) and layout["profile_artifact"]
    none_yet = peerpull("convert", corner["source"], f"{corner['registry']}/profiled/none:1", "--chunk-size",
                        str(CHUNK), "--profile", "registry", "--quiet")
    assert "warning: startup profile ignored: the registry holds no startup profile" in none_yet.stderr


@pytest.mark.root
@pytest.mark.slow
def test_learn_runs_the_entrypoint_and_lays_out_what_it_read(registry_session, tmp_path: Path) -> None:
    rnd = random.Random(5)
    layer = images.LayerBuilder()
    layer.dir("app")
    read = []
    for d in range(6):
        layer.dir(f"app/lib{d}")
        for i in range(20):
            layer.file(f"app/lib{d}/m{i:02d}.py", rnd.randbytes(rnd.randint(100, 20_000)))
            if i % 5 == 0:
                read.append(f"/app/lib{d}/m{i:02d}.py")
    layer.file("app/unused.bin", os.urandom(24 << 20))  # never read: the start reads a small share
    layout = tmp_path / "learn"
    images.write_oci_image(layout, [images.busybox_layer().tar_bytes(), layer.tar_bytes()],
                           entrypoint=["/bin/busybox", "sh", "-c"], cmd=[f"cat {' '.join(read)} >/dev/null; echo read"])
    source = push_layout(layout, registry_session.address, "learn/original")
    target = f"{registry_session.address}/learn/fast:1"
    out = peerpull("convert", source, target, "--profile", "learn", "--json", "-", "--quiet")
    layout_report = json.loads(out.stdout)["layout"]
    assert layout_report is not None, out.stderr
    assert layout_report["moved_files"] >= len(read) and layout_report["profile_artifact"]
    assert layout_report["span_after"] == layout_report["frames_after"]
    assert layout_report["runs_after"] <= 2  # one per layer at most (busybox, then the app's files)


def test_a_seekable_image_is_laid_out_by_its_own_profile(corner: dict[str, str]) -> None:
    """SRC already seekable: the layers its profile reads are re-framed, the others pass through."""
    target = f"{corner['registry']}/profiled/relaid:1"
    report = json.loads(peerpull("convert", corner["plain"], target, "--chunk-size", str(CHUNK), "--profile",
                                 corner["profile"], "--json", "-", "--quiet").stdout)
    assert not report["already_seekable"] and report["layout"]["moved_files"] >= len(STARTUP)
    assert [layer["converted"] for layer in report["layers"]] == [True, False, False]
    manifest, config, blobs = asyncio.run(fetch_image(target))
    assert config["rootfs"]["diff_ids"] == [sha256_digest(_untar(blobs[d["digest"]])) for d in manifest["layers"]]


def test_a_large_file_read_in_one_place_goes_last_and_the_new_profile_names_that_chunk(
        corner: dict[str, str], tmp_path: Path) -> None:
    facts, toc = _image_toc(corner["plain"], 0)
    big = next(e for e in toc.entries if e.path == "files/random-2.5M")
    reads = [(facts["layer"], big.chunks[3].blob_offset)]  # one chunk of 161, read first
    reads += [(facts["layer"], o) for o in _startup_frames(toc, [DEEP_FILE, "hardlinks/orig", "files/text.txt"])]
    path = tmp_path / "partial.json"
    doc = json.loads(pf.encode(pf.StartupProfile(facts["digest"], tuple(dict.fromkeys(reads)))))
    path.write_text(json.dumps({"image": corner["plain"], "profile": doc}))
    target = f"{corner['registry']}/profiled/partial:1"
    layout = json.loads(peerpull("convert", corner["source"], target, "--chunk-size", str(CHUNK), "--profile",
                                 str(path), "--json", "-", "--quiet").stdout)["layout"]
    assert layout["left_in_place"] == 0 and layout["moved_files"] >= 4
    new_facts, new_toc = _image_toc(target, 0)
    first = [e.path for e in new_toc.entries if e.chunks][:layout["moved_files"]]
    assert first[-2:] == ["files/text.txt", "files/random-2.5M"]  # the read-through large file first

    async def profile() -> pf.StartupProfile | None:
        async with RegistryClient(RegistryConfig()) as client:
            return await registry_profile(client, target, new_facts["digest"])

    pushed = asyncio.run(profile())
    assert pushed is not None
    new_big = next(e for e in new_toc.entries if e.path == "files/random-2.5M")
    offsets = {o for _, o in pushed.reads}
    assert [c.file_offset for c in new_big.chunks if c.blob_offset in offsets] == [big.chunks[3].file_offset]
    assert new_big.chunks[3].digest == big.chunks[3].digest  # the same bytes, framed alike: the same chunk


def test_a_learning_command_without_learn_is_refused_before_any_work() -> None:
    refused = peerpull("convert", "127.0.0.1:9/a:1", "127.0.0.1:9/b:1", "--profile", "registry", "--", "true",
                       check=False)
    assert refused.returncode == 2 and "need --profile learn" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.root
@pytest.mark.slow
def test_laid_out_image_runs_lazily_with_the_same_tree(lazy_stack: LazyStack, tmp_path: Path) -> None:
    """The node daemon serves a reordered layer (and prefetches by its new profile) unchanged."""
    layout = lazy_stack.root / "corner-profiled"
    images.build_corner_case_image(layout)
    source = images.push_layout(layout, lazy_stack.registry.address, "lazyprofile/original")
    plain = f"{lazy_stack.registry.address}/lazyprofile/plain:1"
    lazy_stack.convert(source, plain, CHUNK)
    facts, toc = _image_toc(plain, 0)
    doc = json.loads(pf.encode(pf.StartupProfile(facts["digest"], tuple(dict.fromkeys(
        (facts["layer"], o) for o in _startup_frames(toc, STARTUP[::-1]))))))
    path = tmp_path / "startup.json"
    path.write_text(json.dumps({"image": plain, "profile": doc}))
    target = f"{lazy_stack.registry.address}/lazyprofile/fast:1"
    lazy_stack.convert(source, target, CHUNK, "--profile", str(path))
    report = lazy_stack.pull(target)
    assert report["lazy"] == 3 and report["downloaded"] == 0
    ctrd = lazy_stack.containerd
    assert run_container(ctrd, target, [], snapshotter="peerpull").strip() == ENTRYPOINT_OUTPUT
    lazy_tree = container_tree(ctrd, target, snapshotter="peerpull")
    pull_image(ctrd, source)
    assert lazy_tree == container_tree(ctrd, source)
