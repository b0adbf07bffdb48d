"""Startup profiles on local disk: one JSON file per manifest digest under the snapshotter root.

Blocking file work: callers run these methods in a worker thread. A file that no longer decodes
is removed (and logged) rather than served.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from converter.format.digest import is_digest
from converter.format.errors import FormatError
from snapshotter.service import profiles as pf

log = structlog.get_logger(__name__)


class ProfileStore:
    def __init__(self, root: Path) -> None:
        self.dir = root / "profiles"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, manifest_digest: str) -> Path:
        if not is_digest(manifest_digest):
            raise FormatError(f"not a manifest digest: {manifest_digest[:80]!r}")
        return self.dir / (manifest_digest.split(":", 1)[1] + ".json")

    def read_bytes(self, manifest_digest: str) -> bytes | None:
        """The stored document as it is (for peers), None when there is none."""
        try:
            return self.path(manifest_digest).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, manifest_digest: str) -> pf.StartupProfile | None:
        data = self.read_bytes(manifest_digest)
        if data is None:
            return None
        try:
            return pf.decode(data, manifest_digest)
        except FormatError as exc:
            log.warning("profile_corrupt_removed", manifest=manifest_digest, error=str(exc))
            self.path(manifest_digest).unlink(missing_ok=True)
            return None

    def save(self, profile: pf.StartupProfile) -> bool:
        """Keep `profile` if it is better than the stored one (`profiles.better`); True when it was."""
        if not pf.better(profile, self.load(profile.manifest_digest)):
            return False
        path = self.path(profile.manifest_digest)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pf.encode(profile))
        os.replace(tmp, path)
        return True
