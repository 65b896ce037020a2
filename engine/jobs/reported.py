"""A fine-tune's progress told through its log, for a run with no database to write to (a Job on a
Kubernetes cluster): the pod prints one `@modeldeck {json}` line per report among its ordinary log lines,
and the supervisor here, reading the pod's log, turns them back into the job's progress.

Events, one JSON object each:
- {"phase": NAME}: work whose progress cannot be counted started;
- {"metrics": {...}, "fields": {...}, "points": {"train": [[step, loss], ...], "eval": [...]}}: a progress
  report; `points` holds only the loss points not told before, so a line stays short however long the run;
- {"done": LINEAGE}: the adapter is written (LINEAGE is what its modeldeck.json holds);
- {"failed": REASON} or {"cancelled": true}: how the run ended otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREFIX = "@modeldeck "


def parse(line: str) -> dict[str, Any] | None:
    """The event a log line carries, if it is one."""
    if not line.startswith(PREFIX):
        return None
    try:
        event = json.loads(line[len(PREFIX):])
    except ValueError:
        return None  # a line cut short (the log rotated mid-line): the next report says it all again
    return event if isinstance(event, dict) else None


class LogReporter:
    """What a fine-tune run needs from its context (log, phase, report), written to stdout as events."""

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self._told = {"train": -1, "eval": -1}  # the last step of each curve already printed

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    def emit(self, event: dict[str, Any]) -> None:
        print(PREFIX + json.dumps(event, separators=(",", ":")), flush=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.emit({"phase": name})
        yield

    def report(self, metrics: dict[str, Any] | None = None, **fields: Any) -> None:
        metrics = dict(metrics or {})
        curve = metrics.pop("curve", None) or {}
        points = {}
        for which, told in self._told.items():
            new = [point for point in curve.get(which, []) if point[0] > told]
            if new:
                points[which] = new
                self._told[which] = new[-1][0]
        self.emit({"metrics": metrics, "fields": fields, "points": points})
