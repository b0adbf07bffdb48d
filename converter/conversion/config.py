"""The convert section of peerpull's configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

from converter.format import toc as fmt
from converter.format.settings import setting


@dataclass(frozen=True)
class ConvertConfig:
    chunk_size: int = setting(fmt.DEFAULT_CHUNK_SIZE, lo=fmt.MIN_CHUNK_SIZE, hi=fmt.MAX_CHUNK_SIZE)
    compression_level: int = setting(fmt.DEFAULT_COMPRESSION_LEVEL, lo=1, hi=22)
    jobs: int = setting(max(1, os.cpu_count() or 1), lo=1, hi=256, shown="number of cores")  # layers at once
    # 2 packs small files into shared frames (docs/format.md); 1 writes the older one-frame-per-file layout
    format_version: int = setting(fmt.FORMAT_VERSION, lo=min(fmt.SUPPORTED_VERSIONS), hi=max(fmt.SUPPORTED_VERSIONS))
    work_dir: str | None = None  # where converted layers wait for upload; None: the system temp dir
