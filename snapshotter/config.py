"""The snapshotter section of peerpull's configuration: where the node daemon keeps snapshots,
its socket for containerd, the FUSE mount, and how far ahead it fetches."""

from __future__ import annotations

from dataclasses import dataclass

from converter.format.settings import setting

PREFETCH_MODES = ("none", "sequential", "file", "layer")
STREAM_MODES = ("auto", "always", "never")
FUSE_BACKENDS = ("auto", "kernel", "pyfuse3")


@dataclass(frozen=True)
class SnapshotterConfig:
    root: str = "/var/lib/peerpull/snapshotter"  # metadata, snapshot directories, layer TOCs, the FUSE mount
    socket: str = "/run/peerpull/snapshotter.sock"  # containerd's [proxy_plugins.peerpull] address
    name: str = "peerpull"  # the snapshotter name containerd knows us by
    # complete files, decompressed and verified, that FUSE passthrough serves at disk speed; empty:
    # <root>/objects. Must be a plain filesystem: on overlayfs or FUSE the kernel refuses backing files
    object_store_dir: str = ""
    object_store_bytes: int = setting(8 << 30, lo=64 << 20, hi=1 << 50)  # least recently used go first; open ones stay
    # files at least this large, once complete in the cache, are copied into the object store and
    # read through FUSE passthrough at disk speed (kernel backend only); smaller ones gain nothing
    passthrough_min_bytes: int = setting(1 << 20, lo=0, hi=1 << 50)
    # the fd holder that keeps the FUSE connection across a daemon crash (docs/snapshotter.md, "Live restart")
    fd_holder_socket: str = "/run/peerpull/fd-holder.sock"
    # keep a copy of the FUSE connection in that holder (started if none answers) so a crashed daemon's
    # successor serves on; only with the kernel transport (pyfuse3's session cannot be resumed)
    fd_holder: bool = True
    # live restart (docs/snapshotter.md): `peerpull daemon --takeover` listens here; SIGHUP to the
    # running daemon hands it the FUSE connection once it listens (waiting up to handover_timeout_s)
    handover_socket: str = "/run/peerpull/handover.sock"
    handover_drain_s: float = setting(5.0, lo=0.0, hi=300)  # in-flight FUSE requests finish before handing over
    handover_timeout_s: float = setting(30.0, lo=0.5, hi=3600)  # for the other side of a handover to appear
    # a stop (SIGTERM) leaves the FUSE mount to the fd holder for the next daemon instead of unmounting:
    # running containers stall until it starts, never fail. False: unmount and end the holder (private set-ups)
    keep_mount_on_stop: bool = True
    # startup profiles (docs/snapshotter.md): record the chunks a container of an image reads first,
    # until no new chunk for profile_quiet_s, profile_max_s after its start, or profile_max_chunks
    profile_record: bool = True
    profile_quiet_s: float = setting(5.0, lo=0.1, hi=600)
    profile_max_s: float = setting(60.0, lo=1.0, hi=3600)
    profile_max_chunks: int = setting(50_000, lo=1, hi=200_000)
    # a recording that read more than this share of its layers' bytes is a whole-image workload
    # (a scan, a copy): not kept as a profile, which every node would fetch before starting
    profile_max_share: float = setting(0.5, lo=0.01, hi=1.0)
    profile_push: bool = True  # push recorded profiles to the image's repository (needs write access)
    profile_find_timeout_s: float = setting(1.0, lo=0.05, hi=30)  # local disk → peers → registry, at most this
    # a layer whose TOC digest the manifest vouches for is committed as soon as its TOC is on disk and
    # its tree built in the background; Prepare, View and Mounts of snapshots on top of it wait for the
    # build (and fail with one line if it failed). False: each layer's Prepare waits for its own tree
    defer_tree_build: bool = True
    containerd_address: str = "/run/containerd/containerd.sock"  # for `peerpull pull`
    namespace: str = "default"  # containerd namespace `peerpull pull` writes images to
    # none: fetch only what is read; sequential (default): a small file read from the network brings
    # its blob neighbours along, and once a file has been read sequentially past
    # prefetch_sequential_bytes (a whole-file reader, not a library's scattered page faults) the
    # rest of it is fetched ahead in parallel; file: the rest of a file on its first read (moved 6x
    # the bytes for big shared libraries); layer: file, and once a container reads from a layer,
    # the layer's large files in the background. Background fetches queue behind on-demand reads.
    prefetch: str = setting("sequential", choices=PREFETCH_MODES)
    prefetch_sequential_bytes: int = setting(4 << 20, lo=0, hi=1 << 40)
    # the rest of an image streamed in the background at the link's rate (docs/snapshotter.md):
    # auto: once containers read more than stream_after_bytes of it outside its startup profile;
    # always: right after the pull (and the profile); never: on demand only
    stream: str = setting("auto", choices=STREAM_MODES)
    stream_after_bytes: int = setting(64 << 20, lo=0, hi=1 << 50)
    profile_fetch: bool = True  # at pull time, stream the image's startup profile when one is found
    # decompressed chunks kept in memory for the FUSE read path: the kernel asks for a chunk in
    # several pieces, and packed small files share one; the page cache keeps what was read (keep_cache)
    memory_cache_bytes: int = setting(64 << 20, lo=16 << 20, hi=64 << 30)
    # kernel readahead on the FUSE mount (the default 128 halves throughput)
    fuse_read_ahead_kb: int = setting(1024, lo=0, hi=1 << 20)
    # concurrent FUSE requests served (readers block on fetches, not on each other)
    fuse_max_tasks: int = setting(512, lo=8, hi=65536)
    # who speaks the FUSE protocol (docs/snapshotter.md): kernel: peerpull's own session on /dev/fuse
    # (FUSE passthrough, a connection a successor can take over); pyfuse3: libfuse; auto (default):
    # kernel when /dev/fuse and the protocol the kernel offers allow it, else pyfuse3
    fuse_backend: str = setting("auto", choices=FUSE_BACKENDS)
