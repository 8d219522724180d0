"""The one mapping between this project's errors and gRPC status codes, both ways.

Servicers (replication here, the control API in api/) call `abort(context, error)`: it logs one
line and ends the RPC with the code `code_for(error)` gives and the error's message. Clients turn
a failed call back into a typed error with `error_from_rpc`, so the message a user reads names the
object at the site where the check failed.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from targetd_repl.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    JournalClosed,
    JournalCorrupt,
    JournalFull,
    NotFound,
    OutOfRange,
    SequenceGap,
    SequenceTrimmed,
    TargetdReplError,
    WriteProtected,
)
from targetd_repl.replication.errors import Aborted, PeerUnavailable, PermissionDenied, StaleEpoch

log = logging.getLogger(__name__)

# Errors that share a status code but that a client must tell apart travel with their name in
# this trailing-metadata key (a stale epoch is FAILED_PRECONDITION, and fences the caller).
ERROR_KEY = "targetd-repl-error"
# Errors that share a status code with others travel with their name in trailing metadata.
_NAMED: dict[str, type[TargetdReplError]] = {
    "stale-epoch": StaleEpoch,
    "sequence-gap": SequenceGap,
    "sequence-trimmed": SequenceTrimmed,
}

# Most specific first: the first class the error is an instance of decides.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (JournalCorrupt, grpc.StatusCode.DATA_LOSS),  # a record that fails its CRC
    (SequenceGap, grpc.StatusCode.OUT_OF_RANGE),  # an out-of-order batch
    (SequenceTrimmed, grpc.StatusCode.OUT_OF_RANGE),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),  # an LBA past the end of a volume
    (JournalFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (JournalClosed, grpc.StatusCode.UNAVAILABLE),  # shutting down
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Aborted, grpc.StatusCode.ABORTED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),  # incl. StaleEpoch
    (WriteProtected, grpc.StatusCode.FAILED_PRECONDITION),
)


def code_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an error; INTERNAL for anything unexpected."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def message_for(error: BaseException) -> str:
    if isinstance(error, TargetdReplError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


def abort(context: grpc.ServicerContext, error: BaseException, what: str = "") -> NoReturn:
    """End the RPC with the status for `error` (logged as one line) and raise."""
    code = code_for(error)
    message = message_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s: %s", what or "rpc", message, exc_info=error)
    else:
        log.warning("%s refused (%s): %s", what or "rpc", code.name, message)
    for name, kind in _NAMED.items():
        if isinstance(error, kind):
            context.set_trailing_metadata(((ERROR_KEY, name),))
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


# Client side: status codes back to error types.
_ERRORS: dict[grpc.StatusCode, type[TargetdReplError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.DATA_LOSS: JournalCorrupt,
    grpc.StatusCode.RESOURCE_EXHAUSTED: JournalFull,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: PeerUnavailable,
    grpc.StatusCode.CANCELLED: PeerUnavailable,
    grpc.StatusCode.ABORTED: Aborted,
}


def error_from_rpc(error: grpc.RpcError, peer: str = "peer") -> TargetdReplError:
    """A typed error for a failed call, its message prefixed with the site that refused."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    kind = _ERRORS.get(code, TargetdReplError)
    if isinstance(error, grpc.Call):
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_KEY and isinstance(value, str) and value in _NAMED:
                kind = _NAMED[value]
    return kind(f"site {peer}: {details or code.name.lower()}")
