"""Configuration: defaults < file < environment < flags, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.format.errors import ConfigError
from peerpull.config import load_config


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[convert]\nchunk_size = 2097152\njobs = 3\n[registry]\ninsecure_hosts = ["a:5000"]\n')
    config = load_config(str(path), environ={})
    assert (config.convert.chunk_size, config.convert.jobs, config.registry.insecure_hosts) == (2 << 20, 3, ("a:5000",))
    env = {"PEERPULL_CONVERT_JOBS": "5", "PEERPULL_REGISTRY_INSECURE_HOSTS": "b:1,c:2"}
    config = load_config(str(path), environ=env)
    assert (config.convert.jobs, config.registry.insecure_hosts) == (5, ("b:1", "c:2"))
    config = load_config(str(path), flags={"convert": {"jobs": 7}}, environ=env)
    assert (config.convert.jobs, config.convert.chunk_size) == (7, 2 << 20)
    assert load_config(environ={"PEERPULL_CONFIG": str(path)}).convert.jobs == 3


@pytest.mark.parametrize("text, message", [
    ("[convert]\nchunk_size = 10\n", "chunk_size"),
    ("[convert]\nnope = 1\n", "unknown key convert.nope"),
    ("[nope]\n", "unknown section"),
    ("[convert]\njobs = 'many'\n", "not a valid int"),
    ("not toml [", "config file"),
])
def test_bad_config_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), environ={})


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"), environ={})
    with pytest.raises(ConfigError, match="log.level"):
        load_config(environ={"PEERPULL_LOG_LEVEL": "loud", "PEERPULL_CONFIG": ""}, path=None)


def test_environment_typos_are_refused_but_the_tools_own_variables_are_not() -> None:
    with pytest.raises(ConfigError, match="did you mean PEERPULL_PEER_TOKEN"):
        load_config(environ={"PEERPULL_PEER_TOKN": "x"}, path=None)
    tools = {"PEERPULL_PYTHON": "/usr/bin/python3", "PEERPULL_VENV": ".venv", "PEERPULL_TEST_RUNDIR": "/run/x",
             "PEERPULL_CONTAINERD_VERSIONS": "1"}
    assert load_config(environ=tools, path=None).convert.jobs == load_config(environ={}, path=None).convert.jobs
