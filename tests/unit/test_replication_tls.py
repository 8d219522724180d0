"""Site-to-site mutual TLS: a pair over mTLS; a wrong, missing or misnamed certificate refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from targetd_repl.model import PairMode
from targetd_repl.replication.certs import make_ca, make_lab, make_site_cert
from targetd_repl.replication.channel import TlsFiles, open_channel
from targetd_repl.v1 import replication_pb2, replication_pb2_grpc
from tests.unit.test_replication_support import BS, converged, image, make_group, two_sites


def _handshake(channel: grpc.Channel, site: str) -> grpc.RpcError:
    stub = replication_pb2_grpc.ReplicationStub(channel)
    view = replication_pb2.HandshakeView(site=site, group="g", journal_first_seq=1)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Handshake(replication_pb2.HandshakeRequest(view=view), timeout=5)
    return caught.value


def test_mtls_pair_and_refusals(tmp_path: Path) -> None:
    tls = make_lab(tmp_path / "pki", ("site-a", "site-b", "site-c"))
    a, b = two_sites(tmp_path, tls={"site-a": tls["site-a"], "site-b": tls["site-b"]})
    try:
        make_group(a, "g", ["v1"])
        a.manager.create_pair("g", "site-b", PairMode.ASYNC)
        a.engine.write("v1", 0, b"t" * (8 * BS))
        converged(a, b, "g")
        assert image(a, "v1") == image(b, "v1")

        # A certificate of the same CA naming another site, claiming to be site-a.
        channel = open_channel(b.address, "site-b", tls["site-c"])
        error = _handshake(channel, "site-a")
        channel.close()
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "site-c" in (error.details() or "")

        # A certificate from another CA: the TLS handshake fails.
        make_ca(tmp_path / "rogue")
        rogue = make_site_cert(tmp_path / "rogue", "site-a", tmp_path / "rogue")
        mixed = TlsFiles(ca=tls["site-a"].ca, cert=rogue.cert, key=rogue.key)
        channel = open_channel(b.address, "site-b", mixed)
        assert _handshake(channel, "site-a").code() is grpc.StatusCode.UNAVAILABLE
        channel.close()

        # No client certificate at all.
        creds = grpc.ssl_channel_credentials(root_certificates=tls["site-a"].ca.read_bytes())
        channel = grpc.secure_channel(
            b.address, creds, options=[("grpc.ssl_target_name_override", "site-b")]
        )
        assert _handshake(channel, "site-a").code() is grpc.StatusCode.UNAVAILABLE
        channel.close()

        # The client checks the server too: site-b's certificate does not name site-c.
        channel = open_channel(b.address, "site-c", tls["site-a"])
        assert _handshake(channel, "site-a").code() is grpc.StatusCode.UNAVAILABLE
        channel.close()

        # Plaintext to a TLS server.
        channel = grpc.insecure_channel(b.address)
        assert _handshake(channel, "site-a").code() is grpc.StatusCode.UNAVAILABLE
        channel.close()
    finally:
        a.close()
        b.close()
