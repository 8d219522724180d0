"""The QEMU real-kernel lab: host preparation, guest boot, scenarios."""
