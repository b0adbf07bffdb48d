"""Build-time conversion: image sources, tar streams, seekable layer writing, `convert` and `inspect`."""
