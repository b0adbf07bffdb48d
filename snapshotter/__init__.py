"""containerd remote snapshotter: gRPC snapshots API, metadata, FUSE layers (built on `peer`).

Empty until the snapshotter issue lands.
"""
