"""Image manifests as the registry serves them: decoded and checked before any stage relies on them.

Part of the registry base (not of conversion) because the runtime reads manifests too: warm-up,
the snapshotter's pull and the test bench.
"""

from __future__ import annotations

from typing import Any

from converter.format import untrusted
from converter.format.digest import is_digest
from converter.format.errors import FormatError, UnsupportedError
from converter.registry import media_types as mt
from converter.registry.client import MAX_BLOB_BYTES


def check_descriptor(desc: Any, what: str) -> None:
    if not isinstance(desc, dict) or not is_digest(desc.get("digest")):
        raise FormatError(f"{what}: malformed descriptor (no well-formed sha256 digest)")
    size = desc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < MAX_BLOB_BYTES:
        raise FormatError(f"{what}: descriptor of {desc['digest']} has an impossible size {size!r}")
    check_annotations(desc, f"{what}: descriptor of {desc['digest']}")


def check_annotations(doc: dict[str, Any], what: str) -> None:
    annotations = doc.get("annotations")
    if annotations is not None and not (isinstance(annotations, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())):
        raise FormatError(f"{what}: 'annotations' is not a map of strings")


def parse_manifest(body: bytes, media_type: str, what: str) -> dict[str, Any]:
    """Decode an image manifest and check the fields the converter relies on."""
    try:
        manifest = untrusted.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what}: manifest is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{what}: manifest is not a JSON object")
    media_type = manifest.get("mediaType", media_type)
    if media_type in (mt.OCI_INDEX, mt.DOCKER_MANIFEST_LIST):
        raise FormatError(f"{what}: expected an image manifest, got an index")
    if media_type not in (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST):
        raise UnsupportedError(f"{what}: unsupported manifest media type {media_type!r}")
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise FormatError(f"{what}: manifest lacks config or layers")
    for desc in [config, *layers]:
        check_descriptor(desc, f"{what}: manifest")
    check_annotations(manifest, f"{what}: manifest")
    return manifest
