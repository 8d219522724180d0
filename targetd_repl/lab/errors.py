"""Errors of the lab tooling (host side): preparation, booting and scenario failures."""

from __future__ import annotations

from targetd_repl.errors import TargetdReplError


class LabError(TargetdReplError):
    """The lab cannot be prepared or a guest cannot be booted (missing tool, download failed)."""


class ScenarioFailed(LabError):
    """A scenario ran but failed, timed out or produced no result; the message carries the logs."""


class ScenarioAssertion(AssertionError):
    """Inside the guest: a scenario's check on data failed (the scenario fails with it)."""
