"""The handshake view of one group at this site, as a role change needs it (roles/).

Replication builds views inside its runners; a role change also needs the view of a group whose
runner is stopped or of the other kind (a fenced old primary runs a receiver but still holds an
unsent bitmap that covers its writes after the split), and adds the fields only roles/ knows:
the changed bitmap, the switchover backlog and the pending survivor (persisted in the pair row).
"""

from __future__ import annotations

from dataclasses import replace

from targetd_repl.model import DEFAULT_REGION_SIZE, PairInfo, Role
from targetd_repl.replication.handshake import HandshakeView
from targetd_repl.replication.primary import PrimaryPair
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.replication.tracking import ReplicationState, UnsentBitmaps
from targetd_repl.roles.state import ChangedBitmaps
from targetd_repl.storage.group_store import GroupStore
from targetd_repl.storage.metadata import MetadataStore


def extras(view: HandshakeView, store: GroupStore, pair: PairInfo | None) -> HandshakeView:
    """Add what roles/ keeps: the changed bitmap (only on the primary of the current
    generation), the switchover backlog and the survivor of a pending resolve."""
    cur = view.current
    own = cur is not None and cur.primary_site == view.site
    has_changed = own and ChangedBitmaps.exists(store.group_dir, store.volume_ids())
    backlog = pair.backlog_from_seq if pair is not None and own else None
    if backlog is not None and cur is not None and not 1 <= backlog <= cur.prev_last_seq:
        backlog = None
    return replace(
        view,
        has_changed=has_changed,
        backlog_from_seq=backlog,
        survivor=pair.survivor if pair is not None else None,
    )


def site_view(
    site: str,
    store: GroupStore,
    metadata: MetadataStore,
    running: PrimaryPair | SecondaryGroup | None,
) -> HandshakeView:
    """This site's view of the group, whatever runs for it now."""
    pair = _pair(metadata, store)
    if isinstance(running, PrimaryPair):
        return extras(running.view(), store, pair)
    journal = store.journal
    last = journal.durable_seq
    rstate = ReplicationState.load(store.group_dir)
    consistent = running.consistent if isinstance(running, SecondaryGroup) else rstate.consistent
    acked = last
    has_unsent = False
    # A fenced old primary keeps the unsent bitmap of its last generation as primary: it covers
    # its writes above what the peer acknowledged (seed 003's first difference information).
    if UnsentBitmaps.path_for(store.group_dir, store.volume_ids()[0]).exists():
        info = store.info
        acked = min(info.acked_seq, last)
        sizes = {v: store.volume(v).info.size_bytes for v in store.volume_ids()}
        bitmaps = UnsentBitmaps.open(store.group_dir, sizes, DEFAULT_REGION_SIZE)
        has_unsent = bitmaps.any() or last > acked
    view = HandshakeView(
        site=site,
        group=store.name,
        role=store.role,
        history=tuple(metadata.epoch_history(store.info.id)),
        last_seq=last,
        acked_seq=acked,
        journal_first_seq=min(journal.first_seq, last + 1),
        applied_seq=min(store.applied_seq, last),
        has_unsent=has_unsent,
        clean_shutdown=rstate.clean_shutdown,
        consistent=consistent,
    )
    if view.current is None and store.role is Role.PRIMARY:
        return view
    return extras(view, store, pair)


def _pair(metadata: MetadataStore, store: GroupStore) -> PairInfo | None:
    return next((p for p in metadata.list_pairs() if p.group_id == store.info.id), None)
