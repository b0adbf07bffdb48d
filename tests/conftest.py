"""Shared pytest set-up: each fixture family lives in its own module under tests/support."""

import os

# Opt-in, not skipped (CI=true fails on skips): the containerd 1.7/2.x runs need those releases
# unpacked (scripts/containerd_versions.sh) and take minutes; PEERPULL_CONTAINERD_VERSIONS=1 collects them.
collect_ignore = [] if os.environ.get("PEERPULL_CONTAINERD_VERSIONS") == "1" else ["test_containerd_versions.py"]

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
