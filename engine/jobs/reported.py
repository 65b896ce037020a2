"""A fine-tune's progress told through its log, for a run with no database to write to (a Job on
Kubernetes, a batch job on SLURM): the run prints one `@modeldeck {json}` line per report among its
ordinary log lines (LogReporter), and its supervisor here, reading that log, turns them back into the
job's progress (RunEvents).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PREFIX = "@modeldeck "
CURVE_POINTS = 400  # a loss curve kept in a job's metrics is thinned to about this many points
REPORTED_FIELDS = ("progress", "eta_s")  # what a run's log may set on the job (its modeldeck may be another version)


def add_point(curve: list, step: int, loss: float) -> None:
    """A loss point on a curve (the same step again replaces it), thinned evenly past CURVE_POINTS, the
    newest point kept."""
    if curve and curve[-1][0] == step:
        curve[-1] = [step, round(loss, 5)]
        return
    curve.append([step, round(loss, 5)])
    if len(curve) > CURVE_POINTS:
        del curve[-2::-2]


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


class RunEvents:
    """The supervisor's side: a run's log lines, its events become the job's progress (the same metrics a
    local run writes: step, loss curve, tokens/s, ETA) and its other lines go to this job's own log.
    `show_phase(name)` tells a phase the run has entered."""

    def __init__(self, ctx, show_phase: Callable[[str], None]):
        self.ctx, self.show_phase = ctx, show_phase
        curve = ctx.metrics.get("curve") or {}  # a re-attached supervisor goes on with the curve it had
        self.train_curve: list[list[float]] = list(curve.get("train", []))
        self.eval_curve: list[list[float]] = list(curve.get("eval", []))
        self.metrics: dict = {}
        self.outcome: dict | None = None  # the run's last word: done, failed or cancelled
        self.run_phase: str | None = None  # the last phase the run itself told
        self._unreported: dict | None = None  # the fields of progress read again (see `line`), not yet reported

    @property
    def training(self) -> bool:
        return self.metrics.get("phase") == "training"

    def line(self, text: str, echo: bool = True) -> None:
        """One line of the run's log: an event is taken; any other line is copied to this job's log (`echo`:
        unless it was already, by an earlier supervisor of the same run)."""
        event = parse(text)
        if event is None:
            if echo:
                print(text, flush=True)
        else:
            self.take(event, report=echo)

    def flush(self) -> None:
        """Report the progress read again without reporting it (a new supervisor reading a long log anew)."""
        if self._unreported is not None:
            self.ctx.report(self.metrics | {"curve": {"train": self.train_curve, "eval": self.eval_curve}},
                            **self._unreported)
            self._unreported = None

    def take(self, event: dict, report: bool = True) -> None:
        if "phase" in event:
            self.run_phase = event["phase"]
            self.metrics["phase"] = event["phase"]
            if report:
                self.show_phase(event["phase"])
        elif "metrics" in event:
            for which, curve in (("train", self.train_curve), ("eval", self.eval_curve)):
                for step, loss in event.get("points", {}).get(which, []):
                    if not curve or step > curve[-1][0]:  # a resumed run tells its history again
                        add_point(curve, step, loss)
            self.metrics = event["metrics"]
            self.ctx.metrics.pop("elapsed_s", None)  # training now: steps and loss, not a phase's time
            fields = {k: v for k, v in (event.get("fields") or {}).items() if k in REPORTED_FIELDS}
            self._unreported = fields
            if report:
                self.flush()
        else:
            self.outcome = event
