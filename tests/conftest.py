"""Shared pytest set-up: each fixture family lives in its own module under tests/support."""

pytest_plugins = [
    "tests.support.registry_fixtures",
    "tests.support.containerd_fixtures",
    "tests.support.image_fixtures",
]
