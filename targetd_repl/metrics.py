"""Prometheus metrics of a site, in the text exposition format, on a small HTTP endpoint
(`[metrics] listen` in site.toml; GET /metrics).

Per pair (labels group, peer, role): lag in records and seconds, the received and applied seqs,
the unsent regions, resync progress, and the state (one series per known state, 1 for the
current one). Per group (labels group, role): the journal's durable records (a counter: its
`rate()` is the group's write IOPS), used and limit bytes. Per site: up since.

Every scrape reads the live figures through the control service (no background sampling): a
scrape costs a few metadata reads per group.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from targetd_repl.api.service import ControlService, JournalView, PairStatusView
from targetd_repl.errors import TargetdReplError
from targetd_repl.model import PairState

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "targetd_repl"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


class _Family:
    """One metric family: HELP, TYPE and its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = f"{PREFIX}_{name}"
        self.lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {kind}"]

    def add(self, value: float, **labels: str) -> None:
        self.lines.append(f"{self.name}{_labels(**labels) if labels else ''} {value:g}")


def _pair_families(pairs: Iterable[PairStatusView]) -> list[_Family]:
    lag_records = _Family("pair_lag_records", "gauge", "Records the peer does not hold yet.")
    lag_seconds = _Family(
        "pair_lag_seconds", "gauge", "Age of the oldest record the peer does not hold yet."
    )
    acked = _Family("pair_acked_seq", "gauge", "Highest seq the secondary holds durably.")
    applied = _Family("pair_applied_seq", "gauge", "Highest seq the secondary applied.")
    unsent = _Family("pair_unsent_regions", "gauge", "Regions set in the unsent bitmap.")
    done = _Family("pair_resync_done_bytes", "gauge", "Bytes of the current resync copied.")
    total = _Family("pair_resync_total_bytes", "gauge", "Bytes the current resync copies.")
    state = _Family("pair_state", "gauge", "1 for the pair's current state, 0 for the others.")
    for pair in pairs:
        who = {"group": pair.group, "peer": pair.peer, "role": str(pair.role)}
        lag_records.add(pair.lag_records, **who)
        lag_seconds.add(pair.lag_seconds, **who)
        acked.add(pair.acked_seq, **who)
        applied.add(pair.applied_seq, **who)
        unsent.add(pair.unsent_regions, **who)
        done.add(pair.resync_done_bytes, **who)
        total.add(pair.resync_total_bytes, **who)
        for known in PairState:
            state.add(1 if pair.state is known else 0, **who, state=str(known))
    return [lag_records, lag_seconds, acked, applied, unsent, done, total, state]


def _journal_families(journals: Iterable[JournalView]) -> list[_Family]:
    records = _Family(
        "journal_records_total", "counter", "Durable journal records (rate(): writes/s)."
    )
    used = _Family("journal_used_bytes", "gauge", "Bytes the journal holds.")
    limit = _Family("journal_limit_bytes", "gauge", "The journal's size limit.")
    for journal in journals:
        who = {"group": journal.group, "role": str(journal.role)}
        records.add(journal.last_seq, **who)
        used.add(journal.used_bytes, **who)
        limit.add(journal.limit_bytes, **who)
    return [records, used, limit]


def render(service: ControlService) -> str:
    """The exposition text of every metric, read now."""
    site = service.site_info()
    up = _Family("start_time_seconds", "gauge", "When this controller started (Unix time).")
    up.add(site.started_at, site=site.name)
    families = [up, *_pair_families(service.list_pairs()), *_journal_families(service.journals())]
    return "\n".join(line for family in families for line in family.lines) + "\n"


class MetricsServer:
    """GET /metrics on `host`:`port` (0: the OS chooses; see `port`). `stop()` ends it."""

    def __init__(self, service: ControlService, host: str, port: int) -> None:
        source = service

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render(source).encode()
                except TargetdReplError as error:
                    self.send_error(503, f"metrics unavailable: {error}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
