"""Journal replication between sites: sender, receiver, resync, handshake, channel."""
