"""The error hierarchy. Every error names the object it is about; layers above map them to SCSI
sense (datapath), gRPC status codes (api) and one-line CLI messages.
"""

from __future__ import annotations


class TargetdReplError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidArgument(TargetdReplError):
    """A request that can never succeed as written (bad size, bad name, bad block size)."""


class NotFound(TargetdReplError):
    """A named object (volume, group, pair, snapshot, site) does not exist."""


class AlreadyExists(TargetdReplError):
    """A named object already exists and the request would create it again."""


class FailedPrecondition(TargetdReplError):
    """The object exists but its state forbids the request (e.g. deleting a paired volume)."""


class IllegalTransition(FailedPrecondition):
    """A pair command or event that its state table does not allow; the message names the pair,
    its state and where the command applies (roles/pair_state.py)."""


# --- storage -----------------------------------------------------------------------------------


class StorageError(TargetdReplError):
    """Base of storage-engine errors."""


class OutOfRange(StorageError, InvalidArgument):
    """An I/O request that reaches past the end of a volume (SCSI: LBA OUT OF RANGE)."""


class Misaligned(StorageError, InvalidArgument):
    """A byte offset or length that is not a multiple of the volume's logical block size."""


class JournalError(StorageError):
    """Base of journal errors."""


class JournalFull(JournalError):
    """Appending would pass the journal's size limit. Nothing was appended."""


class JournalCorrupt(JournalError):
    """A record before the tail fails its checks: reported, never skipped."""


class SequenceTrimmed(JournalError):
    """A reader asked for a sequence number that was already trimmed away."""


class SequenceGap(JournalError):
    """A replicated record's sequence number is not the next one expected (strict order)."""


class JournalClosed(JournalError):
    """The journal was closed while the caller waited on it."""


class BitmapCorrupt(StorageError):
    """A persisted bitmap fails its checksum or header checks."""


class SnapshotError(StorageError):
    """Base of snapshot errors."""


class SnapshotCorrupt(SnapshotError):
    """A snapshot's before-image store fails its checks before its tail."""


class MetadataError(StorageError):
    """The metadata store cannot be opened or migrated."""


# --- data path ---------------------------------------------------------------------------------


class WriteProtected(TargetdReplError):
    """A write reached a volume whose group is secondary here (SCSI: DATA PROTECT)."""


# --- LIO -----------------------------------------------------------------------------------------


class LioError(TargetdReplError):
    """LIO (configfs, through rtslib) refused a change; the message names the object."""
