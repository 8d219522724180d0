"""RoleManager: the role-change commands of a site (failover.py, rejoin.py, switchover.py,
extent.py, verify.py), composed, with what ties them to the running site:

  * hooks on the replication runners (ReplicationManager.on_attach): a primary runner asks the
    manager for the stream of a rejoin in progress (`plan_hook`) and adds the changed bitmap,
    the switchover backlog and a pending survivor to its handshake view (`view_hook`); a new
    primary still draining a switchover starts with its sender held; a rejoin's target starts
    its receiver held;
  * recovery at start, *before* replication starts: a failover whose epoch was recorded is
    finished, the changed bitmap's hook and a switchover's copy-on-read are installed again;
    after replication started (`resume`), the drain and the bulk copies continue;
  * the status of the role change of each group, for the control API.

Order in the daemon: RoleManager(...); roles.start(); manager.start(); roles.resume();
... roles.stop(); manager.stop().
"""

from __future__ import annotations

import logging

from targetd_repl.replication import wire
from targetd_repl.replication.channel import TlsFiles
from targetd_repl.replication.handshake import HandshakeDecision, HandshakeView
from targetd_repl.replication.manager import ReplicationManager
from targetd_repl.replication.primary import PrimaryPair, StreamPlan
from targetd_repl.replication.secondary import SecondaryGroup
from targetd_repl.roles.core import RoleSettings, RoleStatus
from targetd_repl.roles.extent import CopyStep
from targetd_repl.roles.peer import RolePeerServicer
from targetd_repl.roles.state import RejoinBitmaps, TargetBitmaps
from targetd_repl.roles.verify import Verify, VerifyStep
from targetd_repl.roles.views import extras, site_view
from targetd_repl.storage.engine import StorageEngine
from targetd_repl.v1 import replication_pb2

__all__ = ["CopyStep", "RoleManager", "RoleSettings", "RoleStatus", "VerifyStep"]

log = logging.getLogger(__name__)


class RoleManager(Verify):
    """See the module docstring."""

    def __init__(
        self,
        engine: StorageEngine,
        replication: ReplicationManager,
        site: str,
        tls: TlsFiles | None,
        settings: RoleSettings | None = None,
    ) -> None:
        super().__init__(engine, replication, site, tls, settings)
        self._rejoin_init()
        self._switchover_init()
        replication.on_attach = self._on_attach
        replication.on_delete = self._on_delete

    def servicer(self) -> RolePeerServicer:
        return RolePeerServicer(self)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Recover persisted role changes (before ReplicationManager.start)."""
        for info in self._engine.list_groups():
            store = self._engine.group(info.name)
            state = self._state(store)
            if state.empty():
                continue
            try:
                self._recover_failover(store)
                self._recover_switchover(store)
            except Exception:
                log.exception("group %s: cannot recover its role change", info.name)

    def resume(self) -> None:
        """Continue background work (after ReplicationManager.start)."""
        for info in self._engine.list_groups():
            store = self._engine.group(info.name)
            state = self._state(store)
            if state.switchover is not None and state.switchover.promoted:
                self._start_drain(info.name)
            if state.rejoin is not None:
                with self._lock(info.name):
                    self._continue_rejoin(info.name)

    def stop(self) -> None:
        self._stopping.set()
        with self._guard:
            cancels = list(self._cancel.values())
            threads = list(self._threads.values())
        for cancel in cancels:
            cancel.set()
        for thread in threads:
            thread.join(timeout=10)

    # --- hooks ---------------------------------------------------------------------------------

    def _on_attach(self, group: str, runner: PrimaryPair | SecondaryGroup) -> None:
        store = runner.store
        state = self._state(store)
        if isinstance(runner, PrimaryPair):
            runner.plan_hook = lambda d, v: self._plan_hook_safe(group, d, v)
            runner.view_hook = lambda view: extras(
                view, store, self._engine.metadata.get_pair(group)
            )
            if state.switchover is not None and state.switchover.promoted:
                runner.held = True
            if state.rejoin is not None:
                runner.set_roles_floor(state.rejoin.seq + 1)
        elif state.target is not None and not runner.held:
            runner.hold(state.target.saved_snapshot)

    def _on_delete(self, group: str) -> None:
        """The pair is gone: forget the group's role changes (their snapshots stay, listed)."""
        store = self._store(group)
        with self._lock(group):
            self._stop_bulk(group)
            with self._guard:
                backlog = self._backlogs.pop(group, None)
            store.before_io = None
            if backlog is not None:
                backlog.missing.remove_files()
            self._remove_changed(store)
            sizes = self._sizes(store)
            for kind in (RejoinBitmaps, TargetBitmaps):
                kind.open(store.group_dir, sizes, self._settings.region_size).remove_files()
            self._states.forget(store.group_dir)

    def _plan_hook_safe(
        self, group: str, decision: HandshakeDecision, peer: HandshakeView
    ) -> StreamPlan | None:
        if self._stopping.is_set():
            return None
        return self._plan_hook(group, decision, peer)

    # --- what the control API and the peer ask -----------------------------------------------

    def status(self, group: str) -> RoleStatus:
        self._engine.metadata.get_group(group)  # NotFound names an unknown group
        return self._status(group)

    def probe_answer(self, group: str, site: str) -> replication_pb2.ProbeResponse:
        pair = self._pair(group)
        self._check_peer(pair, site, group)
        store = self._store(group)
        view = site_view(self._site, store, self._engine.metadata, self._running(group))
        return replication_pb2.ProbeResponse(
            view=wire.view_to_proto(view), state=wire.state_to_proto(pair.state), detail=pair.detail
        )

    def record_survivor(
        self, request: replication_pb2.RecordSurvivorRequest
    ) -> replication_pb2.ProbeResponse:
        group = request.group
        with self._lock(group):
            pair = self._pair(group)
            self._check_peer(pair, request.site, group)
            if request.survivor not in (self._site, request.site):
                raise ValueError(f"survivor {request.survivor!r} is not in the pair")
            self._engine.metadata.set_pair_roles(group, survivor=request.survivor)
        self._survivor_recorded(group, request.survivor)
        return self.probe_answer(group, request.site)
