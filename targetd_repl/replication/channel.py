"""Site-to-site gRPC plumbing: mutual-TLS credentials, channel and server options, and the check
that the peer's certificate names the site it claims to be.

Each site has one certificate, signed by the lab's (or the operator's) CA, whose subject CN and a
DNS subject alternative name are the site's name (certs.py makes them). The server requires a
client certificate (`require_client_auth=True`) and a servicer checks that it names the calling
site; the client verifies the server's certificate against the name of the site it dials
(`grpc.ssl_target_name_override`), whatever address the site listens on. Without TLS files
(unit tests only) channels are insecure and on loopback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from targetd_repl.replication.errors import PermissionDenied

# Batches are up to a few MiB (settings.batch_bytes); a single record can carry a whole large
# SCSI write. The same limit on both ends: every channel and server here uses these options.
MAX_MESSAGE_BYTES = 64 << 20

_COMMON_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A dead link must not leave a stream hanging: HTTP/2 pings every 10 s, 5 s to answer.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one site: the CA that signs every site, and this site's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def server_options() -> list[tuple[str, int | str]]:
    """Options for the replication server (`grpc.server(..., options=server_options())`)."""
    return [
        *_COMMON_OPTIONS,
        # Accept the client's pings (keepalive) down to every 5 s.
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ]


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: the server shows its site certificate and requires one from the client."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def add_port(server: grpc.Server, address: str, tls: TlsFiles | None) -> int:
    """Bind `address` ("127.0.0.1:0" for a port the OS picks) and return the port bound."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def open_channel(address: str, peer_site: str, tls: TlsFiles | None) -> grpc.Channel:
    """A channel to `peer_site` at `address`; with TLS, the server's certificate must name
    `peer_site` (the address is only where to connect, not who we trust)."""
    options = list(_COMMON_OPTIONS)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    ca, cert, key = tls.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    options.append(("grpc.ssl_target_name_override", peer_site))
    return grpc.secure_channel(address, credentials, options=options)


def peer_names(context: grpc.ServicerContext) -> set[str] | None:
    """The names the caller's verified certificate carries (CN and DNS SANs), or None when the
    call is not over TLS (insecure test servers)."""
    # The stubs type the values as bytes; at run time each is a list of bytes values.
    auth = cast(Mapping[str, list[bytes]], context.auth_context())
    security = [_text(v) for v in auth.get("transport_security_type", [])]
    if "ssl" not in security:
        return None
    names = {_text(v) for v in auth.get("x509_common_name", [])}
    names.update(_text(v) for v in auth.get("x509_subject_alternative_name", []))
    return names


def check_peer(context: grpc.ServicerContext, site: str) -> None:
    """Refuse (PermissionDenied) a TLS caller whose certificate does not name `site`."""
    names = peer_names(context)
    if names is None:
        return
    if site not in names:
        shown = ", ".join(sorted(names)) or "no name"
        raise PermissionDenied(
            f"the caller claims to be site {site!r} but its certificate names {shown}"
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
