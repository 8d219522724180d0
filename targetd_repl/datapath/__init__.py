"""The TCMU data path: the kernel's SCSI commands for our LUNs, served in pure Python.

Layers, one module each, never mixed (tcmu-runner's lesson):

* transport - `discovery` (which uio devices are ours, pyudev), `uio` (open, mmap, doorbell),
  `ring` (mailbox, entries, completion: bytes and offsets only);
* SCSI - `scsi` (CDB -> status, sense, data-in), with `cdb`, `sense`, `pages`, `sgl`, `rangelock`;
* storage boundary - `backend` (the Protocol the storage engine implements), `memory_backend`;
* loop - `runner` (one ring: poll, dispatch to workers, complete, kick), `service` (a runner per
  device as devices come and go), `__main__` (serve memory/file LUNs for the lab).

`fake_kernel` stands in for target_core_user.c in tests and benchmarks.
"""
