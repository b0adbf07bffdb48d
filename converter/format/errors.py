"""The one rooted error taxonomy of peerpull.

Every error a user can cause or meet derives from `PeerpullError`, and callers tell outcomes
apart by type, never by message text. Each protocol edge maps these to its own vocabulary at
exactly one place: the CLI to one line and an exit code (peerpull/exit_codes.py), gRPC to a
status (snapshotter/service/grpc_errors.py), FUSE to an errno.
"""

from __future__ import annotations


class PeerpullError(Exception):
    """Root of every error peerpull raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PeerpullError):
    """Bad configuration file, environment variable, flag or request argument."""


class FormatError(PeerpullError):
    """A blob, TOC, footer or tar stream is malformed, truncated or lies about itself."""


class DigestMismatchError(FormatError):
    """Bytes do not hash to the digest they were promised to have."""


class NoFooterError(FormatError):
    """The blob does not end with a peerpull footer: an ordinary layer, or one cut short."""


class NotFoundError(PeerpullError):
    """The object (snapshot, image, blob, file) does not exist."""


class RegistryError(PeerpullError):
    """The registry answered with something we cannot use."""


class RegistryUnreachableError(RegistryError):
    """No connection to the registry (refused, DNS failure, timeout after retries)."""


class AuthError(RegistryError):
    """Credentials missing or refused (HTTP 401/403, token endpoint failure)."""


class RegistryNotFoundError(NotFoundError, RegistryError):
    """The repository, tag, manifest or blob does not exist in the registry (HTTP 404)."""


class UnsupportedError(PeerpullError):
    """Valid input that peerpull does not handle (e.g. a media type or tar feature)."""


class NotSeekableError(UnsupportedError):
    """The layer is an ordinary one, not seekable: containerd downloads and unpacks it itself."""


class AlreadyExistsError(PeerpullError):
    """The object (snapshot, image) already exists."""


class FailedPreconditionError(PeerpullError):
    """The object is in the wrong state for the request (e.g. removing a snapshot that has children)."""


class ContainerdError(PeerpullError):
    """containerd refused or failed a request."""
