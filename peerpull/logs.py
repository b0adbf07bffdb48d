"""structlog set-up: console rendering on a terminal, JSON lines otherwise, stdlib loggers bridged.

Logs go to stderr so that command output (tables, JSON) on stdout stays clean.
"""

from __future__ import annotations

import logging
import sys

import structlog

from peerpull.config import LogConfig

# Libraries whose own stdlib logging is routed through structlog's formatting.
_BRIDGED = ("aiohttp", "grpc", "zeroconf", "pyfuse3", "asyncio")


def configure_logging(config: LogConfig) -> None:
    level = getattr(logging, config.level.upper())
    use_json = config.format == "json" or (config.format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _BRIDGED:
        logging.getLogger(name).setLevel(max(level, logging.WARNING) if level < logging.WARNING else level)
