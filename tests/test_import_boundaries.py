"""The runtime (peer node, node daemon) never loads the build-time conversion pipeline.

The one allowed module is the convert section of the configuration (`converter.conversion.config`,
a frozen dataclass importing only the format base): the daemon's config object holds every section.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from converter.format.annotations import SEEKABLE_MEDIA_TYPE
from converter.registry import media_types as mt

ALLOWED = {"converter.conversion.config"}


def _conversion_modules_after_import(module: str) -> list[str]:
    code = (f"import sys, {module}\n"
            "print('\\n'.join(m for m in sys.modules if m.startswith('converter.conversion.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return [line for line in result.stdout.splitlines() if line and line not in ALLOWED]


@pytest.mark.parametrize("module", ["peer.node", "peer.warm", "peerpull.daemon"])
def test_runtime_does_not_import_conversion(module: str) -> None:
    assert _conversion_modules_after_import(module) == []


def test_seekable_media_type_is_the_registry_one() -> None:
    assert SEEKABLE_MEDIA_TYPE == mt.OCI_LAYER_ZSTD
