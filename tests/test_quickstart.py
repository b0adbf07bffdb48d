"""The README's main job, `peerpull quickstart`, runs end to end on its private set-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.containerd_fixtures import containerd_missing


def test_quickstart_runs_both_images_with_identical_output(tmp_path) -> None:
    if reason := containerd_missing():
        pytest.skip(reason)
    result = subprocess.run([sys.executable, "-m", "peerpull", "quickstart", "--work-dir", str(tmp_path / "qs")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "outputs identical: yes" in result.stdout
    assert result.stdout.count("hello from a peerpull image") == 2
    assert "seekable: yes" in result.stdout
    assert not (tmp_path / "qs").exists()  # cleaned up without --keep
