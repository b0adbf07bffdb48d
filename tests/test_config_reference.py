"""docs/configuration.md states every config key, default and bound exactly as the code has them."""

from __future__ import annotations

from pathlib import Path

from peerpull.config_reference import render_reference, rendered_in

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_configuration_reference_matches_the_code() -> None:
    assert rendered_in(DOC.read_text()) == render_reference(), (
        "docs/configuration.md is stale: regenerate its table with "
        "python -c 'from peerpull.config_reference import render_reference; print(render_reference())'")


def test_the_reference_names_every_bound_a_user_can_hit() -> None:
    text = render_reference()
    for needle in ("`PEERPULL_PEER_TOKEN`", "`upload_chunk_bytes` | `16777216 (16 MiB)` | 65536",
                   "`health_interval_s` | `2.0` | 0.05", "one of zeroconf, static, dns, none"):
        assert needle in text, needle
