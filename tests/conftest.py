"""Settings for every test: Hypothesis examples have no per-example deadline.

The machines that run these tests are shared and loaded (QEMU guests on two cores): a deadline
measures the neighbours, not the code. Speed is shown by `bench/`, never by a timed test.
"""

from hypothesis import settings

settings.register_profile("targetd-repl", deadline=None)
settings.load_profile("targetd-repl")
