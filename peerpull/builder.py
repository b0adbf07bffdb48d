"""Build a Dockerfile with buildah (Debian's `buildah` package, rootful) in private storage.

Every buildah call gets `--root`/`--runroot` under one directory and the vfs driver, so a build
never touches the host's container storage (/var/lib/containers) and needs no overlay support;
removing that directory removes everything the build made. RUN steps use chroot isolation (no
user namespaces or CNI needed). The built image leaves as an OCI layout (for the converter) and,
when asked, as a plain push to a registry.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converter.format.errors import AuthError, ConfigError, PeerpullError, RegistryError
from converter.registry.config import RegistryConfig
from converter.registry.reference import ImageReference

PACKAGE = "buildah"
TAIL_LINES = 4  # of buildah's output in a failure's one line
_STEP = re.compile(r"^STEP (\d+)/(\d+): (.*)$")
_REFUSED = re.compile(r"unauthorized|authentication required|denied|403 forbidden|401", re.IGNORECASE)


class BuildError(PeerpullError):
    """buildah ran and failed (exit 1); the message ends with the last lines it printed."""


def find_buildah() -> str:
    path = shutil.which("buildah")
    if path is None:
        raise ConfigError(f"buildah not found in PATH: install Debian's {PACKAGE} package (apt-get install {PACKAGE})")
    return path


@dataclass(frozen=True)
class Step:
    """One `STEP i/n: INSTRUCTION` line of a build."""

    index: int
    count: int
    instruction: str


def parse_step(line: str) -> Step | None:
    m = _STEP.match(line.strip())
    return Step(int(m[1]), int(m[2]), m[3]) if m else None


def _tail(lines: deque[str]) -> str:
    useful = [" ".join(line.split()) for line in lines if line.strip()]
    return " | ".join(useful[-TAIL_LINES:]) or "no output"


class Buildah:
    """buildah with storage of its own under `storage` (vfs driver)."""

    def __init__(self, storage: Path, registry: RegistryConfig) -> None:
        self.binary = find_buildah()
        self.storage = storage
        self.registry = registry
        self.base = [self.binary, "--root", str(storage / "root"), "--runroot", str(storage / "runroot"),
                     "--storage-driver", "vfs"]

    async def _call(self, args: list[str], on_line: Callable[[str], None]) -> tuple[int, deque[str]]:
        proc = await asyncio.create_subprocess_exec(*self.base, *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        tail: deque[str] = deque(maxlen=40)
        assert proc.stdout is not None
        try:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                tail.append(line)
                on_line(line)
            return await proc.wait(), tail
        finally:
            if proc.returncode is None:  # cancelled: do not leave buildah running
                proc.kill()
                await proc.wait()

    def _tls(self, refs: list[str]) -> list[str]:
        """`--tls-verify=false` when a registry involved is plain HTTP to peerpull (loopback or insecure)."""
        for text in refs:
            try:
                ref = ImageReference.parse(text)
            except PeerpullError:
                continue
            if ref.is_loopback or ref.registry in self.registry.insecure_hosts:
                return ["--tls-verify=false"]
        return ["--tls-verify=false"] if self.registry.insecure_hosts else []

    def _auth(self) -> list[str]:
        return ["--authfile", self.registry.docker_config] if self.registry.docker_config else []

    async def build(self, dockerfile: Path, context: Path, tag: str, build_args: list[str],
                    on_line: Callable[[str], None]) -> str:
        """Build `dockerfile` in `context` as local image `tag`; returns the image id."""
        iidfile = self.storage / "iid"
        extra = [a for kv in build_args for a in ("--build-arg", kv)]
        rc, tail = await self._call(["bud", "--isolation", "chroot", "--format", "oci", "--iidfile", str(iidfile),
                                     *self._tls([]), *self._auth(), *extra, "-f", str(dockerfile), "-t", tag,
                                     str(context)], on_line)
        if rc != 0:
            raise BuildError(f"buildah build of {dockerfile} failed (exit {rc}): {_tail(tail)}")
        return iidfile.read_text().strip()

    async def export_layout(self, image: str, layout: Path, tag: str, on_line: Callable[[str], None]) -> str:
        """Write `image` as an OCI image layout; returns `oci:DIR:TAG` for the converter."""
        rc, tail = await self._call(["push", image, f"oci:{layout}:{tag}"], on_line)
        if rc != 0:
            raise BuildError(f"buildah could not write the OCI layout {layout} (exit {rc}): {_tail(tail)}")
        return f"oci:{layout}:{tag}"

    async def push(self, image: str, destination: str, on_line: Callable[[str], None]) -> None:
        """Push `image` as it was built (gzip layers) to a registry."""
        rc, tail = await self._call(["push", *self._tls([destination]), *self._auth(), image,
                                     f"docker://{destination}"], on_line)
        if rc != 0:
            cls = AuthError if any(_REFUSED.search(line) for line in tail) else RegistryError
            raise cls(f"pushing the original image to {destination} was refused (exit {rc}): {_tail(tail)}")
