"""The node daemon: the peer component, the FUSE mount and the snapshots service in one process
and one event loop, started and torn down in order (sockets closed, FUSE unmounted or kept for a
successor, metadata flushed), whatever stops it. Where its FUSE connection comes from and goes to
across restarts is live_restart.py's policy.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import structlog

from converter.format.errors import ConfigError
from converter.registry.config import RegistryConfig
from peer.config import PeerConfig
from peer.node import PeerNode
from peerpull.host_checks import check_host, check_socket_path, writable_dir
from peerpull.live_restart import Adopted, LiveRestart, install_sighup
from peerpull.status.images import ImageLocality
from snapshotter.config import SnapshotterConfig
from snapshotter.cri.component import start_cri_proxy
from snapshotter.cri.config import CriConfig
from snapshotter.fs.file_reader import FileReader
from snapshotter.fs.fusefs import LayerFS
from snapshotter.fs.objects import ObjectStore, store_root
from snapshotter.fs.passthrough import Passthrough, announce
from snapshotter.fs.request_timeout import check_request_timeout
from snapshotter.service.grpc_service import SnapshotService, serve
from snapshotter.service.image_fetch import ImageFetch
from snapshotter.service.mounts import Layout
from snapshotter.service.profiles import StartupProfile, share_of_layers
from snapshotter.service.profiles_recorder import ProfileRecorder
from snapshotter.service.profiles_source import ProfileFinder
from snapshotter.service.profiles_store import ProfileStore
from snapshotter.service.remote import RemoteLayers
from snapshotter.service.store import SnapshotStore

log = structlog.get_logger(__name__)


class NodeDaemon:
    """Each component gets only its own config section."""

    def __init__(self, snapshotter: SnapshotterConfig, peer: PeerConfig, registry: RegistryConfig,
                 takeover: bool = False, cri: CriConfig | None = None) -> None:
        self.config = snapshotter
        self.cri = cri or CriConfig()
        self.layout = Layout(Path(snapshotter.root))
        self.live = LiveRestart(snapshotter, self.layout.fuse, self.layout.root, takeover)
        self.peer = PeerNode(peer, registry)
        self._prefetch_parallel = peer.prefetch_parallel
        self.fs: LayerFS | None = None
        self.service: SnapshotService | None = None
        self.profiles: ProfileFinder | None = None  # the ProfileSource of this node's startup profiles
        self.image_fetch: ImageFetch | None = None
        check_request_timeout(peer, registry)  # a kernel FUSE timeout shorter than a fetch aborts the mount

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        check_host()
        sc = self.config
        socket_path = Path(sc.socket)
        check_socket_path(socket_path)
        writable_dir(self.layout.root, "snapshotter root", "give a writable directory (--root DIR, snapshotter.root)")
        writable_dir(socket_path.parent, "socket directory",
                     "give a socket path in a writable directory (--socket PATH, snapshotter.socket)")
        objects = ObjectStore(store_root(sc.root, sc.object_store_dir), sc.object_store_bytes)  # refuses overlayfs
        loop = asyncio.get_running_loop()
        install_sighup(loop, self.live)  # from the start: SIGHUP's default would end the process
        try:
            # a predecessor's connection, before anything binds: a handing-over daemon releases its
            # socket and port first
            adopted = await self.live.acquire()
            await self._serve(ready, adopted, objects)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            await self.live.finish()  # a requested handover: sockets and port are released by now

    async def _serve(self, ready: asyncio.Event | None, adopted: Adopted | None, objects: ObjectStore) -> None:
        sc = self.config
        socket_path = Path(sc.socket)
        main = asyncio.current_task()
        assert main is not None
        # the stack unwinds (reverse order of creation) before the group waits for its tasks
        async with asyncio.TaskGroup() as group, AsyncExitStack() as stack:
            store = SnapshotStore(self.layout.root / "metadata.db")
            stack.callback(store.close)
            peer_ready = asyncio.Event()
            peer_task = group.create_task(self.peer.run(peer_ready))
            stack.callback(peer_task.cancel)
            await _wait_or_fail(peer_ready, peer_task)
            assert self.peer.fetcher is not None and self.peer.registry is not None
            assert self.peer.streamer is not None
            reader = FileReader(self.peer.fetcher, sc.memory_cache_bytes, sc.prefetch, self._prefetch_parallel,
                                sc.prefetch_sequential_bytes, self.peer.streamer)
            stack.push_async_callback(reader.close)
            self.peer.metrics.watch_memory({"memory_cache": lambda: reader.memory_bytes})
            assert self.peer.cache is not None
            passthrough = Passthrough(objects, self.peer.cache.known, self.peer.fetcher, sc.passthrough_min_bytes)
            stack.push_async_callback(passthrough.close)
            self.fs = LayerFS(reader, on_read=self.peer.metrics.fuse_reads.inc, passthrough=passthrough)
            # profile + background streaming of each pulled image; stopped before the reader and the
            # fetcher close (the stack unwinds in reverse)
            self.image_fetch = ImageFetch(self.peer.streamer, sc)  # its profile source: _profiles below
            stack.push_async_callback(self.image_fetch.close)
            reader.add_observer(self.image_fetch.observe)
            remote = RemoteLayers(self.layout.root, store, self.fs, self.peer.registry, sc.prefetch,
                                  trust_registry=self.peer.trust_registry, image_fetch=self.image_fetch,
                                  defer_build=sc.defer_tree_build)
            stack.push_async_callback(remote.close)
            restored = remote.restore()
            if self.peer.status is not None:  # /v1/status: how local each image is
                self.peer.status.images = ImageLocality(store, self.fs).report
            try:
                fuse = self.live.mount(self.fs, adopted)
            finally:
                adopted = None  # the mount owns its fd now (or closed it)
            self.fs.passthrough = announce(fuse, passthrough)
            # in the TaskGroup: if the FUSE loop ends or crashes, the group cancels the rest and the
            # daemon exits with its error
            fuse_task = group.create_task(fuse.serve(), name="fuse-loop")
            stack.push_async_callback(self.live.teardown, fuse_task)  # unmount, or keep for a successor
            await self.live.started(group, main)
            recorder = await self._profiles(stack, reader, remote)
            self.service = SnapshotService(store, self.layout, remote,
                                           on_fallback=lambda reason: self.peer.metrics.errors.labels("lazy", reason).inc(),
                                           on_container=recorder.start if recorder is not None else None)
            orphans = await asyncio.to_thread(self.service.remove_orphans)
            server = await serve(self.service, socket_path)
            stack.push_async_callback(server.stop, 5)
            stack.callback(socket_path.unlink, True)
            # kubelet's image service: pull credentials reach the registry client
            await start_cri_proxy(stack, self.cri, self.peer.registry, sc.containerd_address, self.peer.metrics)
            if not Path(sc.containerd_address).exists():
                log.warning("containerd_not_found", address=sc.containerd_address,
                            hint="start containerd with the snippet of `peerpull containerd-config` in its config; "
                                 "until then nothing calls this snapshotter")
            log.info("daemon_ready", socket=str(socket_path), mount=str(self.layout.fuse), layers_restored=restored,
                     snapshots=len(store.all()), orphans_removed=orphans, prefetch=sc.prefetch,
                     stream=sc.stream)
            if ready is not None:
                ready.set()
            await asyncio.Future()  # until cancelled

    async def _profiles(self, stack: AsyncExitStack, reader: FileReader, remote: RemoteLayers) -> ProfileRecorder | None:
        """Startup profiles: kept under the root, served to peers, found for pulls, recorded and pushed."""
        sc = self.config
        assert self.fs is not None and self.peer.registry is not None and self.peer.membership is not None
        store = ProfileStore(self.layout.root)
        session = await stack.enter_async_context(aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=sc.profile_find_timeout_s)))
        membership = self.peer.membership
        finder = ProfileFinder(store, self.peer.registry, deadline_s=sc.profile_find_timeout_s, frames=self.fs.frames,
                               image_layers=remote.image_layers, peers=lambda: [m.address for m in membership.alive()],
                               session=session, token=self.peer.config.token)
        self.profiles = finder
        if self.image_fetch is not None:
            self.image_fetch.use_profiles(finder)
        self.peer.profiles = lambda digest: asyncio.to_thread(store.read_bytes, digest)
        if not sc.profile_record:
            return None

        fs = self.fs

        def frame_sizes(blob: str) -> dict[int, int] | None:
            source = fs.source(blob)
            return {c.blob_offset: c.compressed_length for c in source.chunks} if source is not None else None

        async def recorded(image_ref: str, profile: StartupProfile) -> None:
            layers = await remote.image_layers(image_ref, profile.manifest_digest) or []
            share = share_of_layers(profile, layers, frame_sizes)
            if share > sc.profile_max_share:
                log.info("profile_dropped", image=image_ref, manifest=profile.manifest_digest, chunks=len(profile.reads),
                         share=round(share, 3), reason="read most of the image: streamed, not profiled")
                return
            if not await asyncio.to_thread(store.save, profile):
                log.info("profile_kept", image=image_ref, manifest=profile.manifest_digest, chunks=len(profile.reads))
                return
            log.info("profile_saved", image=image_ref, manifest=profile.manifest_digest, chunks=len(profile.reads))
            if sc.profile_push:
                await finder.publish(image_ref, profile)

        recorder = ProfileRecorder(sc.profile_quiet_s, sc.profile_max_s, sc.profile_max_chunks, recorded)
        stack.push_async_callback(recorder.close)
        reader.add_observer(recorder.observe)
        return recorder


async def _wait_or_fail(event: asyncio.Event, task: asyncio.Task[None]) -> None:
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        task.result()  # raises why the peer component stopped
        raise ConfigError("the peer component stopped during start-up")
