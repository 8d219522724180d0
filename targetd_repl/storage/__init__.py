"""The storage engine: volumes, journal, bitmaps, snapshots, metadata store."""
