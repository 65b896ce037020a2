"""Waiting out a passing outage of a remote target's control plane (a Kubernetes API server that restarts,
a SLURM controller that fails over, a network blip): whoever follows work there keeps the last state it
knew and asks again, and only an outage that lasts is the end of that work."""

from __future__ import annotations

import time


class Outage:
    """A passing outage of a cluster's API (an apiserver restart, a network blip) is waited out by whoever
    follows work there, not made the end of that work: only errors that last `grace_s` are."""

    def __init__(self, grace_s: float = 300.0):
        self.grace_s = grace_s
        self.since: float | None = None

    def over(self) -> None:
        self.since = None

    def lasted_too_long(self) -> bool:
        """Called on each error: whether it is time to give up."""
        now = time.monotonic()
        self.since = self.since or now
        return now - self.since > self.grace_s
