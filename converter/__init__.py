"""Build-time half of peerpull: the seekable layer format, the OCI registry client and image conversion.

This is the lowest package: the error taxonomy root and digest helpers live here, and nothing in it
imports `peer`, `snapshotter` or `peerpull`.
"""
