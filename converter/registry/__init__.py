"""OCI Distribution v2 client on aiohttp: manifests, blobs, ranged reads, pushes, auth."""
