"""Shared pytest set-up: each fixture family lives in its own module under tests/support."""

pytest_plugins = [
    "tests.support.ci_skips",
    "tests.support.registry_fixtures",
    "tests.support.containerd_fixtures",
    "tests.support.image_fixtures",
    "tests.support.lazy_stack",
]

from peerpull.config import LogConfig  # noqa: E402
from peerpull.logs import configure_logging  # noqa: E402

configure_logging(LogConfig(level="warning", format="console"))
