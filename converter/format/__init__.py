"""The base every stage shares: the error taxonomy, digests, bounded settings, the seekable
layer format and its ranged reader."""
