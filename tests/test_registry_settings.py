"""The registry section's bounds: values that would hang, busy-loop or never finish are refused at start."""

from __future__ import annotations

import pytest

from converter.format.errors import ConfigError
from peerpull.config import load_config


def env(**values: str) -> dict[str, str]:
    return {f"PEERPULL_REGISTRY_{k.upper()}": v for k, v in values.items()}


@pytest.mark.parametrize("key,value", [
    ("upload_chunk_bytes", "0"), ("connect_timeout_s", "-1"), ("read_timeout_s", "0"),
    ("request_deadline_s", "0"), ("request_deadline_s", "100000"), ("min_speed_bytes_s", "0"),
    ("backoff_max_s", "-1"), ("backoff_max_s", "1e9"), ("backoff_base_s", "1e9"), ("retries", "-1"),
    ("retries", "1000"), ("max_connections_per_host", "0"),
])
def test_out_of_bounds_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"registry.{key}"):
        load_config(environ=env(**{key: value}))


@pytest.mark.parametrize("platform", ["bogus", "linux", "linux/", "Linux/AMD64", "linux/amd64/v8/x"])
def test_a_platform_must_look_like_os_arch(platform: str) -> None:
    with pytest.raises(ConfigError, match="registry.platform"):
        load_config(environ=env(platform=platform))


def test_defaults_and_a_toml_file(tmp_path) -> None:
    config = load_config(environ={}).registry
    assert config.platform == "" and config.index_platform == "linux/amd64"
    assert (config.connect_timeout_s, config.read_timeout_s, config.request_deadline_s) == (10.0, 20.0, 60.0)
    path = tmp_path / "c.toml"
    path.write_text('[registry]\nrequest_deadline_s = 5\nmin_speed_bytes_s = 65536\nplatform = "linux/arm64/v8"\n')
    config = load_config(str(path), environ={}).registry
    assert (config.request_deadline_s, config.min_speed_bytes_s, config.platform) == (5.0, 65536, "linux/arm64/v8")
