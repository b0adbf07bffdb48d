"""`peerpull convert --profile`: from a startup profile to the files laid out first, and back.

A profile names frames (layer blob digest, frame blob offset) of the image it was recorded on (SRC
itself, or its seekable twin). Through that image's TOCs each frame becomes the files with bytes in
it; a twin layer is matched to SRC's layer by its source-digest annotation, by being the same blob,
or by position with an equal diff_id. After the conversion the frames of the new layers that hold
the file bytes the start read form the new image's profile, pushed next to it so nodes stream the
working set at once.

A profile is a hint: one that cannot be found, is for another image, or names nothing of SRC is
ignored with one warning line and the image is converted as without it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from converter.conversion.convert import ConvertReport, config_diff_ids, frame_spread
from converter.conversion.image_source import ImageSource, ResolvedImage
from converter.format import toc as fmt
from converter.format import untrusted
from converter.format.errors import FormatError, PeerpullError
from converter.format.layer_reader import location_from_annotations, read_toc_frame
from converter.registry import media_types as mt
from converter.registry import referrers
from converter.registry.blob_reader import RegistryBlobReader
from converter.registry.client import RegistryClient
from converter.registry.manifest import parse_manifest
from converter.registry.reference import ImageReference
from snapshotter.service import profiles as pf
from snapshotter.service.profiles_source import registry_profile


class ProfileIgnored(PeerpullError):
    """The profile cannot guide this conversion (the message says why): convert without it."""


# A large file (not packed) of which the start read less than this share goes after every other
# startup file: its unread chunks would otherwise sit between the working set's frames.
MOSTLY_READ = 0.5


class _Read(NamedTuple):
    """One file piece the start read: in the new layer, the frames holding these file bytes."""

    source: str  # source layer digest
    path: str
    file_offset: int
    length: int
    blob: str  # where the profile saw it: profiled layer digest and frame blob offset
    offset: int


@dataclass
class StartupPlan:
    by_layer: dict[str, list[str]]  # source layer digest → TOC paths to move, in their new order
    reads: list[_Read]  # the file pieces the start read, in first-read order
    files: int = 0  # distinct files read
    frames_before: int = 0  # frames of the profiled image the working set occupies
    span_before: int = 0  # frames from the first to the last of them, summed over layers
    runs_before: int = 0  # runs of consecutive frames among them (Range requests), summed over layers
    stale: int = 0  # profile entries that name no frame of a matched layer


@dataclass(frozen=True)
class _Profiled:
    """The image a profile was recorded on: where it is, its layers and their diff_ids."""

    repo: ImageReference
    layers: list[dict[str, Any]]
    diff_ids: list[str]


def read_profile_file(path: str) -> tuple[pf.StartupProfile, ImageReference | None]:
    """A profile document, or the output of `peerpull profile show --json` (its "profile", and the
    image it was shown for: where to find the profiled image)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ProfileIgnored(f"--profile {path}: cannot read it ({exc.strerror})") from None
    try:
        doc = untrusted.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ProfileIgnored(f"--profile {path}: not JSON") from None
    where: ImageReference | None = None
    if isinstance(doc, dict) and isinstance(doc.get("profile"), dict):
        data = json.dumps(doc["profile"]).encode()
        try:
            where = ImageReference.parse(str(doc.get("image")))
        except PeerpullError:
            where = None
    try:
        return pf.decode(data), where
    except FormatError as exc:
        raise ProfileIgnored(f"--profile {path}: {exc}") from None


async def _manifest(client: RegistryClient, ref: ImageReference) -> tuple[str, dict[str, Any]]:
    fetched, _ = await client.resolve_image(ref)
    return fetched.digest, parse_manifest(fetched.body, fetched.media_type, str(ref))


async def _profiled(client: RegistryClient, repo: ImageReference, manifest: dict[str, Any]) -> _Profiled:
    config = await client.get_blob_bytes(repo, manifest["config"]["digest"])
    return _Profiled(repo, list(manifest["layers"]), config_diff_ids(config, f"image in {repo.repository}"))


async def profiled_image(client: RegistryClient, profile: pf.StartupProfile,
                         repos: list[ImageReference]) -> _Profiled:
    """The image the profile was recorded on, looked up by digest in `repos` in turn."""
    for repo in repos:
        try:
            _, manifest = await _manifest(client, repo.with_digest(profile.manifest_digest))
        except PeerpullError:
            continue
        return await _profiled(client, repo, manifest)
    where = ", ".join(f"{r.registry}/{r.repository}" for r in repos) or "no registry repository"
    raise ProfileIgnored(f"the profile is for manifest {profile.manifest_digest[:19]}…, not found in {where}")


async def registry_lookup(client: RegistryClient, source: ImageSource, image: ResolvedImage,
                          dest: ImageReference) -> tuple[pf.StartupProfile, _Profiled]:
    """The profile the registry holds for SRC itself, else for the image now at DST (SRC's seekable twin)."""
    candidates: list[tuple[ImageReference, str]] = []
    if source.registry_ref is not None:
        candidates.append((source.registry_ref, image.digest))
    try:
        digest, _ = await _manifest(client, dest)
        candidates.append((dest, digest))
    except PeerpullError:
        pass  # nothing at DST yet
    for repo, digest in candidates:
        profile = await registry_profile(client, str(repo), digest)
        if profile is not None:
            _, manifest = await _manifest(client, repo.with_digest(digest))
            return profile, await _profiled(client, repo, manifest)
    raise ProfileIgnored(f"the registry holds no startup profile for {source.description} or {dest}")


async def _toc(client: RegistryClient, repo: ImageReference, desc: dict[str, Any]) -> fmt.Toc | None:
    location = location_from_annotations(desc.get("annotations"))
    if location is None:
        return None
    footer, frame = await read_toc_frame(RegistryBlobReader(client, repo, desc["digest"], desc["size"]), location)
    return await asyncio.to_thread(fmt.decode_toc, frame, footer)


def _match(profiled: _Profiled, index: int, source_layers: list[dict[str, Any]], source_ids: list[str]) -> str | None:
    """The source layer digest the profiled image's layer `index` was converted from, if any."""
    desc = profiled.layers[index]
    origin = (desc.get("annotations") or {}).get(fmt.ANNOTATION_SOURCE_DIGEST)
    for src in source_layers:
        if src["digest"] in (origin, desc["digest"]):
            return str(src["digest"])
    if index < len(source_layers) and index < len(profiled.diff_ids) and index < len(source_ids) \
            and profiled.diff_ids[index] == source_ids[index]:
        return str(source_layers[index]["digest"])
    return None


def _pieces(toc: fmt.Toc) -> dict[int, list[tuple[str, int, int]]]:
    """Frame blob offset → the file pieces (path, file offset, length) in it, in stream order."""
    table: dict[int, list[tuple[str, int, int]]] = {}
    for entry in toc.entries:
        for c in entry.chunks:
            table.setdefault(c.blob_offset, []).append((entry.path, c.file_offset, c.length))
    return table


async def plan(client: RegistryClient, profile: pf.StartupProfile, profiled: _Profiled,
               source_layers: list[dict[str, Any]], source_ids: list[str]) -> StartupPlan:
    """Which files of which source layers to lay out first, in first-read order."""
    by_blob = {d["digest"]: i for i, d in enumerate(profiled.layers)}
    frames: dict[str, dict[int, list[tuple[str, int, int]]]] = {}
    tocs: dict[str, fmt.Toc] = {}
    source_of: dict[str, str] = {}
    for blob in profile.layers:
        if blob not in by_blob or (src := _match(profiled, by_blob[blob], source_layers, source_ids)) is None:
            continue
        try:
            toc = await _toc(client, profiled.repo, profiled.layers[by_blob[blob]])
        except PeerpullError:
            continue  # an unreadable TOC: that layer's reads are stale
        if toc is not None:
            tocs[blob], source_of[blob], frames[blob] = toc, src, _pieces(toc)
    result = StartupPlan({}, [])
    read_bytes: dict[tuple[str, str], int] = {}
    read_offsets: dict[str, list[int]] = {}
    for blob, offset in profile.reads:
        pieces = frames.get(blob, {}).get(offset)
        if pieces is None:
            result.stale += 1
            continue
        read_offsets.setdefault(blob, []).append(offset)
        for path, file_offset, length in pieces:
            key = (source_of[blob], path)
            read_bytes[key] = read_bytes.get(key, 0) + length
            result.reads.append(_Read(key[0], path, file_offset, length, blob, offset))
    if not result.reads:
        raise ProfileIgnored(f"the profile ({len(profile.reads)} entries) names no frame of a layer of this image")
    sizes = {(source_of[b], e.path): (e.size, fmt.pack_threshold(t.chunk_size)) for b, t in tocs.items()
             for e in t.entries if (source_of[b], e.path) in read_bytes}
    partly: list[tuple[str, str]] = []
    for key in read_bytes:  # first-read order (dicts keep insertion order)
        size, small = sizes[key]
        if size < small or read_bytes[key] >= MOSTLY_READ * size:
            result.by_layer.setdefault(key[0], []).append(key[1])
        else:
            partly.append(key)
    for src, path in partly:
        result.by_layer.setdefault(src, []).append(path)
    result.files = len(read_bytes)
    for blob, offsets in read_offsets.items():
        spread = frame_spread(tocs[blob], offsets)
        result.frames_before += spread.frames
        result.span_before += spread.span
        result.runs_before += spread.runs
    return result


def new_profile(startup: StartupPlan, report: ConvertReport) -> pf.StartupProfile:
    """The converted image's profile: the frames of the new layers holding the file bytes the
    start read, in first-read order (a layer that passed through unchanged keeps its entries)."""
    layers = {layer.source_digest: layer for layer in report.layers}
    chunks: dict[str, dict[str, list[fmt.Chunk]]] = {
        src: {e.path: e.chunks for e in toc.entries if e.chunks} for src, toc in report.new_tocs.items()}
    reads: list[tuple[str, int]] = []
    for r in startup.reads:
        layer = layers.get(r.source)
        if layer is None:
            continue
        if r.source not in chunks:
            if not layer.converted and layer.digest == r.blob:
                reads.append((r.blob, r.offset))
            continue
        end = r.file_offset + r.length
        for c in chunks[r.source].get(r.path, ()):
            if c.file_offset < end and r.file_offset < c.file_offset + c.length:
                reads.append((layer.digest, c.blob_offset))
    return pf.StartupProfile(report.manifest_digest, tuple(dict.fromkeys(reads)))


async def push_profile(client: RegistryClient, dest: ImageReference, profile: pf.StartupProfile) -> str:
    """Push `profile` as an artifact referring to its manifest in DST's repository; the artifact's digest."""
    subject = await client.get_manifest(dest.with_digest(profile.manifest_digest))
    descriptor = referrers.Descriptor(subject.media_type or mt.OCI_MANIFEST, subject.digest, len(subject.body))
    return await referrers.push_referrer(client, dest, descriptor, pf.PROFILE_MEDIA_TYPE, pf.encode(profile),
                                         pf.PROFILE_MEDIA_TYPE)


def layout_summary(startup: StartupPlan, report: ConvertReport, new: pf.StartupProfile,
                   pushed: str | None) -> dict[str, Any]:
    laid = [layer for layer in report.layers if layer.startup_moved is not None]
    frames_after = span_after = runs_after = 0
    by_source = {layer.digest: layer.source_digest for layer in report.layers}
    for blob in new.layers:
        toc = report.new_tocs.get(by_source.get(blob, ""))
        if toc is not None:
            offsets = [o for b, o in new.reads if b == blob]
            spread = frame_spread(toc, offsets)
            frames_after, span_after = frames_after + spread.frames, span_after + spread.span
            runs_after += spread.runs
    return {
        "startup_files": startup.files,
        "moved_files": sum(layer.startup_moved or 0 for layer in laid),
        "moved_bytes": sum(layer.startup_moved_bytes or 0 for layer in laid),
        "left_in_place": startup.files - sum(layer.startup_moved or 0 for layer in laid),
        "stale_entries": startup.stale,
        "frames_before": startup.frames_before, "span_before": startup.span_before,
        "frames_after": frames_after, "span_after": span_after,
        "runs_before": startup.runs_before, "runs_after": runs_after,
        "layers": len(laid), "profile_artifact": pushed,
    }
