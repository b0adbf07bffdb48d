"""The one rooted error taxonomy of peerpull.

Every error a user can cause or meet derives from `PeerpullError`. Each protocol edge maps these
to its own vocabulary at exactly one place (the CLI to one line and an exit code, gRPC to a status,
FUSE to an errno). `exit_code` is stable: scripts may depend on it.
"""

from __future__ import annotations


class PeerpullError(Exception):
    """Root of every error peerpull raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PeerpullError):
    """Bad configuration file, environment variable or flag."""

    exit_code = 2


class FormatError(PeerpullError):
    """A blob, TOC, footer or tar stream is malformed, truncated or lies about itself."""

    exit_code = 3


class DigestMismatchError(FormatError):
    """Bytes do not hash to the digest they were promised to have."""


class RegistryError(PeerpullError):
    """The registry answered with something we cannot use."""

    exit_code = 4


class RegistryUnreachableError(RegistryError):
    """No connection to the registry (refused, DNS failure, timeout after retries)."""

    exit_code = 5


class AuthError(RegistryError):
    """Credentials missing or refused (HTTP 401/403, token endpoint failure)."""

    exit_code = 6


class NotFoundError(RegistryError):
    """The repository, tag, manifest or blob does not exist (HTTP 404)."""

    exit_code = 7


class UnsupportedError(PeerpullError):
    """Valid input that peerpull does not handle (e.g. a media type or tar feature)."""

    exit_code = 8


class AlreadyExistsError(PeerpullError):
    """The object (snapshot, image) already exists."""

    exit_code = 9


class FailedPreconditionError(PeerpullError):
    """The object is in the wrong state for the request (e.g. removing a snapshot that has children)."""

    exit_code = 10
