"""The gRPC room: containerd's snapshots API, its metadata store, mounts, filters and lazy layer resolution."""
