"""The containerd client room: content, leases, images and diff calls that `peerpull pull` drives."""
