"""Errors the replication layer adds to targetd_repl.errors (each maps to one gRPC status code in
status.py). They subclass the shared hierarchy, so callers that catch FailedPrecondition or
TargetdReplError keep working."""

from __future__ import annotations

from targetd_repl.errors import FailedPrecondition, TargetdReplError


class StaleEpoch(FailedPrecondition):
    """A message from a site whose epoch is older than ours: it must not act as primary."""


class PeerUnavailable(TargetdReplError):
    """The peer site cannot be reached (connection refused, deadline passed, link cut)."""


class PermissionDenied(TargetdReplError):
    """The caller's certificate does not name the site it claims to be, or not the pair's peer."""


class Aborted(TargetdReplError):
    """The operation was cut short by a concurrent one (a newer stream for the same group)."""
