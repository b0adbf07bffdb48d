"""With CI=true a test that skips for a missing tool fails instead; without CI it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SKIPPING = '''
import pytest

def test_needs_a_tool():
    pytest.skip("frobnicator is not installed")

@pytest.fixture
def tool():
    pytest.skip("fixture: widget missing")

def test_needs_a_fixture(tool):
    pass
'''


def _pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    env = {**os.environ, "CI": ci}
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.support.ci_skips", "-p", "no:cacheprovider",
                           "-q", "-rA", str(tmp_path / "test_skipping.py"), "--rootdir", str(tmp_path)],
                          capture_output=True, text=True, env={**env, "PYTHONPATH": str(root)}, cwd=tmp_path,
                          timeout=120)


def test_under_ci_a_skip_is_a_failure(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 error" in result.stdout and "frobnicator is not installed" in result.stdout
    assert "widget missing" in result.stdout


def test_outside_ci_a_skip_stays_a_skip(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "")
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout
