"""Which layer descriptors are in the seekable format: the one predicate every stage shares.

It lives in the format base, not in conversion, so the runtime (warm-up, the snapshotter) can ask
it without loading the conversion pipeline.
"""

from __future__ import annotations

from typing import Any

from converter.format.toc import ANNOTATION_TOC_DIGEST

# The media type of a seekable layer: plain OCI tar+zstd (converter.registry.media_types.OCI_LAYER_ZSTD;
# spelled here because the format base sits below the registry client).
SEEKABLE_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"


def is_seekable_descriptor(desc: dict[str, Any]) -> bool:
    """True when the descriptor is a zstd layer that names its table of contents."""
    annotations = desc.get("annotations") or {}
    return desc.get("mediaType") == SEEKABLE_MEDIA_TYPE and ANNOTATION_TOC_DIGEST in annotations
