"""Protocol buffer definitions (containerd snapshots API) and their generated modules."""
