"""The TCMU data path: uio ring transport, SCSI emulation, handler, runner."""
