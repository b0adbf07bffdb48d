"""The node's chunk fetcher: local cache → cluster peers → origin registry (built on `converter`),
and the peer server other nodes fetch from (see docs/peers.md)."""
