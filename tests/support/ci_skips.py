"""Under CI (CI=true) a skipped test fails: CI must not go green because root, FUSE, containerd,
runc, netns or skopeo went missing. Locally a skip stays a skip, with its reason."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def ci_forbids_skips() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ci_forbids_skips() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"
