"""One image's locality as the local daemon sees it, for the last line of `peerpull pull`."""

from __future__ import annotations

from typing import Any

from converter.format.errors import PeerpullError
from peerpull.config import PeerpullConfig
from peerpull.status.client import fetch_status, local_node_address

TIMEOUT_S = 3.0  # a pull has succeeded by now: a slow status is skipped, not waited for


async def image_locality(config: PeerpullConfig, image: str) -> dict[str, Any] | None:
    """The daemon's `images` entry for `image`, or None when it cannot be asked (it is optional)."""
    try:
        status = await fetch_status(local_node_address(config.peer), config.peer.token, TIMEOUT_S)
    except PeerpullError:
        return None
    images = status.get("images")
    found = [i for i in images if isinstance(i, dict) and i.get("image") == image] if isinstance(images, list) else []
    return found[0] if found else None
