"""The real-kernel lab: QEMU guests booting Debian's kernel over the host's own root (9p).

Host side: `prepare` (kernel, modules, initramfs; cached in `.lab/`), `qemu` (`run_scenario`,
the KVM probe), `__main__` (`python -m targetd_repl.lab prepare|list|run`). Guest side: `guest`
(runs one scenario, writes result.json), `initiator` (open-iscsi), `registry` and the
`scenarios_*` modules. LAB-NOTES.md (shared) records what was measured on these machines.
"""
