"""The FUSE room: layer trees from TOCs, the filesystem operations and the chunk-assembling file reader."""
