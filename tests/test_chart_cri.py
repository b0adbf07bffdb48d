"""The chart's `cri` values: the [cri] section the daemon accepts, only when the proxy is on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from peerpull.config import load_config
from tests.support.helm_render import render_chart

CHART = Path(__file__).resolve().parent.parent / "charts" / "peerpull"


def _config_toml(values: dict | None = None) -> str:
    rendered = render_chart(CHART, values)
    docs = [d for d in yaml.safe_load_all(rendered["configmap.yaml"]) if d]
    return str(docs[0]["data"]["config.toml"])


def test_cri_section_only_when_the_proxy_is_on(tmp_path: Path) -> None:
    assert "[cri]" not in _config_toml()
    text = _config_toml({"cri": {"imageProxy": True, "credentialTtlSeconds": 600}})
    assert tomllib.loads(text)["cri"] == {"image_proxy": True, "socket": "/run/peerpull/cri-image.sock",
                                          "credential_ttl_s": 600}
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(str(path), environ={})  # the daemon accepts it
    assert config.cri.image_proxy and config.cri.credential_ttl_s == 600
    assert config.cri.socket.startswith("/run/peerpull/")  # the host directory the DaemonSet mounts
