"""The README's main job, `peerpull quickstart`, runs end to end on its private set-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from converter.format.errors import PeerpullError
from peerpull.commands.quickstart_cmd import require_lazy
from peerpull.testbed.runner import RunResult
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


def test_quickstart_fails_when_the_lazy_run_fell_back() -> None:
    """What the quickstart does with a lazy run whose layers were downloaded in full: one error."""
    fell_back = RunResult("reg/app:seekable", "lazy", layers=3, lazy_layers=1,
                          fallback_layers=["sha256:" + "a" * 64, "sha256:" + "b" * 64],
                          fallback_reasons=["cannot reach registry reg: [SSL: WRONG_VERSION_NUMBER]"])
    with pytest.raises(PeerpullError, match=r"did not run lazily: 2 of 3 layers fell back .*WRONG_VERSION_NUMBER"):
        require_lazy(fell_back)
    require_lazy(RunResult("reg/app:seekable", "lazy", layers=3, lazy_layers=3))
