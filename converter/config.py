"""The convert section of peerpull's configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

from converter import format as fmt


@dataclass(frozen=True)
class ConvertConfig:
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE
    compression_level: int = fmt.DEFAULT_COMPRESSION_LEVEL
    jobs: int = max(1, os.cpu_count() or 1)  # layers converted at once
    work_dir: str | None = None  # where converted layers wait for upload; None: the system temp dir
