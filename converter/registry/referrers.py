"""OCI artifacts that refer to an image manifest (OCI distribution spec 1.1 "referrers").

An artifact is an image manifest with an `artifactType`, a `subject` (the descriptor of the
manifest it is about), an empty config (`application/vnd.oci.empty.v1+json`, the bytes `{}`) and
its payload as the one layer. Registries with the referrers API index it when it is pushed (they
answer `OCI-Subject`) and list it at `GET /v2/<name>/referrers/<digest>`. Registries without it
(Distribution 2.8, which stores the manifest as it is sent) get the tag-schema fallback: the tag
`sha256-<hex of the subject>` holds an image index of the referrers, read, extended and written
back by the pusher. Concurrent pushers can lose each other's entry there (the spec's own caveat);
for a hint such as a startup profile that only means one artifact fewer to choose from.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from converter.format import untrusted
from converter.format.digest import is_digest, sha256_digest
from converter.format.errors import FormatError, RegistryNotFoundError
from converter.registry import media_types as mt
from converter.registry.client import MAX_MANIFEST_BYTES, RegistryClient
from converter.registry.manifest import check_descriptor
from converter.registry.reference import ImageReference

EMPTY_CONFIG = b"{}"
CREATED = "org.opencontainers.image.created"
MAX_REFERRERS = 1024  # entries kept in a fallback index: older ones are dropped first


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def fallback_tag(digest: str) -> str:
    """The tag-schema fallback's tag for a subject digest: `sha256-<hex>`."""
    algorithm, _, hex_part = digest.partition(":")
    return f"{algorithm}-{hex_part}"


def _index(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries},
                      separators=(",", ":")).encode()


def _entries(body: bytes, what: str) -> list[dict[str, Any]]:
    """The well-formed descriptors of an image index (malformed entries are skipped)."""
    try:
        doc = untrusted.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what}: not valid JSON") from None
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list):
        raise FormatError(f"{what}: not an image index")
    out = []
    for entry in manifests:
        try:
            check_descriptor(entry, what)
        except FormatError:
            continue
        out.append(entry)
    return out


async def push_referrer(client: RegistryClient, repo: ImageReference, subject: Descriptor, artifact_type: str,
                        payload: bytes, payload_type: str) -> str:
    """Push `payload` as an artifact referring to `subject` in `repo`'s repository; its manifest digest."""
    await client.push_blob_bytes(repo, EMPTY_CONFIG)
    payload_digest = await client.push_blob_bytes(repo, payload)
    now = time.time()
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    manifest = {
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": artifact_type,
        "config": Descriptor(mt.OCI_EMPTY, sha256_digest(EMPTY_CONFIG), len(EMPTY_CONFIG)).to_json(),
        "layers": [Descriptor(payload_type, payload_digest, len(payload)).to_json()],
        "subject": subject.to_json(), "annotations": {CREATED: created},
    }
    body = json.dumps(manifest, separators=(",", ":")).encode()
    digest, indexed = await client.put_manifest(repo.with_digest(sha256_digest(body)), body, mt.OCI_MANIFEST)
    if indexed:
        return digest
    tag = repo.with_tag(fallback_tag(subject.digest))
    try:
        entries = _entries((await client.get_manifest(tag)).body, f"referrers index {tag}")
    except (RegistryNotFoundError, FormatError):
        entries = []  # none yet, or one we cannot read: start it afresh
    entry = {**Descriptor(mt.OCI_MANIFEST, digest, len(body)).to_json(), "artifactType": artifact_type,
             "annotations": {CREATED: created}}
    entries = [e for e in entries if e.get("digest") != digest][-(MAX_REFERRERS - 1):] + [entry]
    await client.push_manifest(tag, _index(entries), mt.OCI_INDEX)
    return digest


async def list_referrers(client: RegistryClient, repo: ImageReference, subject_digest: str,
                         artifact_type: str) -> list[dict[str, Any]]:
    """Descriptors of the artifacts of `artifact_type` referring to `subject_digest`, newest first
    (by their created annotation; on a tie, the one listed last): from the referrers API, else
    from the fallback tag (none when neither has any)."""
    what = f"referrers of {subject_digest} in {repo.registry}/{repo.repository}"
    body = await client.get_referrers(repo, subject_digest, artifact_type)
    if body is None:
        try:
            body = (await client.get_manifest(repo.with_tag(fallback_tag(subject_digest)))).body
        except RegistryNotFoundError:
            return []
    found = [e for e in reversed(_entries(body, what)) if e.get("artifactType") == artifact_type]
    found.sort(key=lambda e: str((e.get("annotations") or {}).get(CREATED, "")), reverse=True)
    return found


async def fetch_payload(client: RegistryClient, repo: ImageReference, descriptor: dict[str, Any],
                        subject_digest: str, artifact_type: str, payload_type: str, max_bytes: int) -> bytes:
    """The payload of one referrer, after checking that it is what the descriptor says it is."""
    digest = str(descriptor.get("digest"))
    what = f"artifact {digest[:80]} in {repo.registry}/{repo.repository}"
    if not is_digest(digest) or descriptor.get("size", 0) > MAX_MANIFEST_BYTES:
        raise FormatError(f"{what}: malformed referrer descriptor")
    manifest = untrusted.loads((await client.get_manifest(repo.with_digest(digest))).body)  # verified by digest
    if not isinstance(manifest, dict) or manifest.get("artifactType") != artifact_type:
        raise FormatError(f"{what}: not a {artifact_type} artifact")
    subject, layers = manifest.get("subject"), manifest.get("layers")
    if not isinstance(subject, dict) or subject.get("digest") != subject_digest:
        raise FormatError(f"{what}: refers to another manifest than {subject_digest}")
    if not isinstance(layers, list) or len(layers) != 1:
        raise FormatError(f"{what}: has {len(layers) if isinstance(layers, list) else 'no'} payloads, not one")
    check_descriptor(layers[0], what)
    if layers[0].get("mediaType") != payload_type or layers[0]["size"] > max_bytes:
        raise FormatError(f"{what}: payload is not a {payload_type} of at most {max_bytes} bytes")
    return await client.get_blob_bytes(repo, layers[0]["digest"], max_bytes)
