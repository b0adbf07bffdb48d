"""Lazy pulls from a registry that demands credentials: the daemon uses docker's config.json; without
credentials it falls back to an ordinary pull, loudly (log event and metric), and the image still runs."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from peerpull.testbed.daemon import EmbeddedDaemon
from tests.support import images
from tests.support.auth_registry import PASSWORD, USER, htpasswd_registry, write_docker_config
from tests.support.containerd import NAMESPACE, ContainerdProcess, run_container
from tests.support.lazy_stack import fuse_missing

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _peerpull(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "warning", "--docker-config",
                             str(config), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_lazy_pull_with_credentials_and_loud_fallback_without(tmp_path: Path) -> None:
    if reason := fuse_missing():
        pytest.skip(reason)
    with htpasswd_registry(tmp_path / "registry") as registry:
        good = write_docker_config(tmp_path / "good", registry.address, USER, PASSWORD) / "config.json"
        bad = write_docker_config(tmp_path / "bad", registry.address, USER, "wrong") / "config.json"
        layout = tmp_path / "layout"
        images.build_simple_image(layout, {"secret/data.txt": b"private bytes\n" * 5000})
        _peerpull(good, "convert", "--quiet", f"oci:{layout}:latest", f"{registry.address}/private/app:seekable")
        image = f"{registry.address}/private/app:seekable"

        for name, daemon_config, lazy in (("with-creds", good, 2), ("no-creds", bad, 0)):
            env = {"PEERPULL_REGISTRY_DOCKER_CONFIG": str(daemon_config)}
            with EmbeddedDaemon(tmp_path / name / "daemon", extra_env=env) as daemon:
                ctrd_dir = Path(tempfile.mkdtemp(prefix="ppauth-", dir="/run"))
                with ContainerdProcess(ctrd_dir, proxy_plugins={"peerpull": str(daemon.socket)}) as ctrd:
                    report = json.loads(_peerpull(good, "pull", image, "--address", str(ctrd.socket),
                                                  "--namespace", NAMESPACE, "--json").stdout)
                    assert report["lazy"] == lazy and report["downloaded"] == 2 - lazy, (name, report)
                    out = run_container(ctrd, image, ["/bin/busybox", "wc", "-c", "/secret/data.txt"],
                                        snapshotter="peerpull")
                    assert out.split()[0] == str(len(b"private bytes\n" * 5000))
                fallbacks = daemon.metrics().get('peerpull_chunk_errors_total{reason="AuthError",tier="lazy"}', 0)
                log = daemon.log_tail(50000)
            if lazy:
                assert fallbacks == 0 and "lazy_layer_fallback" not in log
            else:  # never silent: a warning naming the cause, and a counter per fallback
                assert fallbacks == 2, daemon.metrics()
                warnings = [json.loads(line) for line in log.splitlines() if '"lazy_layer_fallback"' in line]
                assert len(warnings) == 2, warnings
                # each names the cause and where the refused credentials came from
                assert all(("refused access" in w["error"] or "requires authentication" in w["error"])
                           and str(bad) in w["error"] for w in warnings), warnings
