"""Decoding JSON that came from outside (registries, layouts): malformed input is a ValueError, always.

`json.loads` raises RecursionError, not ValueError, on deeply nested input such as a registry
answering with megabytes of `[`: callers that catch ValueError would otherwise crash.
"""

from __future__ import annotations

import json
from typing import Any


def loads(data: bytes | str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
