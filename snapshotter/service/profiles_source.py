"""Where a node finds an image's startup profile, and where it publishes the ones it records.

`find` asks local disk, then the live peers (`GET /v1/profiles/<manifest digest>`, all at once,
the first valid answer wins), then the registry (the image's referrers of artifact type
`PROFILE_MEDIA_TYPE`, newest first), all within `deadline_s`: a profile is a hint and must never
hold up a pull. Anything malformed, for another manifest or stale is ignored (`profiles.restrict`).
A profile found remotely is kept on local disk, so the next find is local and peers can have it.

`publish` pushes a recorded profile to the image's repository as an OCI artifact. A registry that
refuses (read-only credentials, no such repository) is logged once as `profile_push_failed` and
not asked again by this process; the profile stays local and peer-served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

import aiohttp
import structlog

from converter.format.errors import FormatError, PeerpullError
from converter.registry import media_types as mt
from converter.registry import referrers
from converter.registry.client import RegistryClient
from converter.registry.reference import ImageReference
from peer.client import auth_headers
from snapshotter.service import profiles as pf
from snapshotter.service.profiles_store import ProfileStore

log = structlog.get_logger(__name__)
REFERRERS_TRIED = 3  # newest artifacts tried before the registry counts as having none


def profile_url(address: str, manifest_digest: str) -> str:
    return f"http://{address}/v1/profiles/{manifest_digest}"


async def registry_profile(client: RegistryClient, image_ref: str, manifest_digest: str) -> pf.StartupProfile | None:
    """The newest valid profile the registry holds for the image (its referrers), or None."""
    repo = ImageReference.parse(image_ref)
    found = await referrers.list_referrers(client, repo, manifest_digest, pf.PROFILE_MEDIA_TYPE)
    for descriptor in found[:REFERRERS_TRIED]:
        try:
            data = await referrers.fetch_payload(client, repo, descriptor, manifest_digest,
                                                 pf.PROFILE_MEDIA_TYPE, pf.PROFILE_MEDIA_TYPE, pf.MAX_PROFILE_BYTES)
            return pf.decode(data, manifest_digest)
        except FormatError as exc:  # a broken artifact: try the next older one
            log.info("profile_artifact_ignored", image=image_ref, artifact=descriptor.get("digest"), error=str(exc))
    return None


class ProfileFinder:
    def __init__(self, store: ProfileStore, client: RegistryClient, *, deadline_s: float,
                 frames: Callable[[str], Collection[int] | None] = lambda blob: None,
                 image_layers: Callable[[str, str], Awaitable[Collection[str] | None]] | None = None,
                 peers: Callable[[], list[str]] = list, session: aiohttp.ClientSession | None = None,
                 token: str = "") -> None:
        self._store = store
        self._client = client
        self._deadline_s = deadline_s
        self._frames = frames
        self._image_layers = image_layers
        self._peers = peers
        self._session = session
        self._headers = auth_headers(token)
        self._push_refused: set[str] = set()  # repositories that refused a push: not asked again

    # ---- finding ------------------------------------------------------------------------------

    async def find(self, image_ref: str, manifest_digest: str) -> pf.StartupProfile | None:
        """The image's profile without stale entries, or None (none found in time, or none valid)."""
        try:
            async with asyncio.timeout(self._deadline_s):
                found = await self._find(image_ref, manifest_digest)
                if found is None:
                    return None
                profile, where = found
                layers = await self._image_layers(image_ref, manifest_digest) if self._image_layers else None
        except TimeoutError:
            log.info("profile_find_timeout", image=image_ref, manifest=manifest_digest, seconds=self._deadline_s)
            return None
        except (PeerpullError, OSError, aiohttp.ClientError) as exc:
            log.info("profile_find_failed", image=image_ref, manifest=manifest_digest, error=str(exc))
            return None
        kept = pf.restrict(profile, self._frames, layers)
        log.info("profile_found", image=image_ref, manifest=manifest_digest, source=where, chunks=len(kept.reads),
                 stale=len(profile.reads) - len(kept.reads))
        return kept if kept.reads else None

    async def _find(self, image_ref: str, manifest_digest: str) -> tuple[pf.StartupProfile, str] | None:
        local = await asyncio.to_thread(self._store.load, manifest_digest)
        if local is not None:
            return local, "local"
        for where, fetch in (("peer", self._from_peers), ("registry", self._from_registry)):
            profile = await fetch(image_ref, manifest_digest)
            if profile is not None:
                await asyncio.to_thread(self._store.save, profile)
                return profile, where
        return None

    async def _from_peers(self, image_ref: str, manifest_digest: str) -> pf.StartupProfile | None:
        addresses = self._peers()
        if self._session is None or not addresses:
            return None
        tasks = [asyncio.ensure_future(self._from_peer(a, manifest_digest)) for a in addresses]
        try:
            for next_done in asyncio.as_completed(tasks):
                profile = await next_done
                if profile is not None:
                    return profile
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _from_peer(self, address: str, manifest_digest: str) -> pf.StartupProfile | None:
        assert self._session is not None
        try:
            async with self._session.get(profile_url(address, manifest_digest), headers=self._headers) as resp:
                if resp.status != 200:
                    return None
                data = await resp.content.read(pf.MAX_PROFILE_BYTES + 1)
            return pf.decode(data, manifest_digest)
        except (aiohttp.ClientError, OSError, FormatError) as exc:
            log.debug("profile_peer_ignored", peer=address, manifest=manifest_digest, error=str(exc))
            return None

    async def _from_registry(self, image_ref: str, manifest_digest: str) -> pf.StartupProfile | None:
        return await registry_profile(self._client, image_ref, manifest_digest)

    # ---- publishing ---------------------------------------------------------------------------

    async def publish(self, image_ref: str, profile: pf.StartupProfile) -> str | None:
        """Push the profile next to the image; its artifact digest, or None when the registry refused."""
        repo = ImageReference.parse(image_ref)
        where = f"{repo.registry}/{repo.repository}"
        if where in self._push_refused:
            return None
        try:
            subject = (await self._client.get_manifest(repo.with_digest(profile.manifest_digest)))
            descriptor = referrers.Descriptor(subject.media_type or mt.OCI_MANIFEST, subject.digest, len(subject.body))
            digest = await referrers.push_referrer(self._client, repo, descriptor, pf.PROFILE_MEDIA_TYPE,
                                                   pf.encode(profile), pf.PROFILE_MEDIA_TYPE)
        except PeerpullError as exc:
            self._push_refused.add(where)
            log.warning("profile_push_failed", image=image_ref, manifest=profile.manifest_digest, error=str(exc),
                        hint="the profile stays on this node and its peers; pushing needs write access")
            return None
        log.info("profile_pushed", image=image_ref, manifest=profile.manifest_digest, artifact=digest,
                 chunks=len(profile.reads))
        return digest
