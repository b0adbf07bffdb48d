"""Registry fixtures: a real Distribution registry per test (or per session), on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from peerpull.testbed.registry import EmbeddedRegistry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[EmbeddedRegistry]:
    with EmbeddedRegistry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRegistry]:
    with EmbeddedRegistry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
