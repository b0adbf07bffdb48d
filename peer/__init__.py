"""The node's chunk fetcher: local cache → cluster peers → origin registry (built on `converter`).

Empty until the chunk-fetcher issue lands; the package exists so that import direction
(`converter` ← `peer` ← `snapshotter` ← `peerpull`) is fixed from the start.
"""
