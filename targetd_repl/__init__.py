"""targetd_repl: two-site block replication for Linux iSCSI (LIO + userspace TCMU + gRPC)."""

__version__ = "0.1.0"
