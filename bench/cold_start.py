"""Cold start to first painted screen against a bare Textual app that paints one label, in the same run,
as a ratio of medians (target: within 1.5×), and to the catalog's rows on screen.

Each run is a new Python process: modeldeck's opens the database, loads the curated catalog and paints
the Community screen; the bare one paints a Label. Both are timed from before the process starts until
Textual's Ready event (the first screen has been drawn); runs alternate, so drift in the machine hits
both. Run: python bench/cold_start.py [--runs 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import fresh_home

# The same path as `modeldeck` with no verb: the app opens the database itself after its first frame.
CHILD = """
import time, sys
from textual import events
from tui.app import ModelDeckApp

class Probe(ModelDeckApp):
    def on_ready(self, event: events.Ready) -> None:
        print(f"painted {time.time():.6f}", flush=True)

    def on_data_loaded(self, message) -> None:
        super().on_data_loaded(message)
        self.call_after_refresh(self.rows_painted)

    def rows_painted(self) -> None:
        print(f"rows {time.time():.6f}", flush=True)
        self.exit()

Probe().run(headless=True)
"""

BARE = """
import time
from textual import events
from textual.app import App
from textual.widgets import Label

class Bare(App):
    def compose(self):
        yield Label("hello")

    def on_ready(self, event: events.Ready) -> None:
        print(f"painted {time.time():.6f}", flush=True)
        self.exit()

Bare().run(headless=True)
"""


def timed(code: str, wanted: tuple[str, ...]) -> dict[str, float]:
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    stamps = dict(line.split() for line in out.stdout.splitlines() if line.startswith(wanted))
    if len(stamps) != len(wanted):
        sys.exit(out.stderr[-2000:])
    return {name: float(stamp) - start for name, stamp in stamps.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    fresh_home()
    subprocess.run([sys.executable, "-c", "import engine; engine.start()"], check=True)  # the database exists
    bare, painted, rows = [], [], []
    timed(BARE, ("painted",)), timed(CHILD, ("painted", "rows"))  # the first runs warm the OS file cache
    for _ in range(args.runs):
        bare.append(timed(BARE, ("painted",))["painted"])
        ours = timed(CHILD, ("painted", "rows"))
        painted.append(ours["painted"])
        rows.append(ours["rows"])

    def runs(times: list[float]) -> str:
        return f"median {statistics.median(times) * 1000:.0f} ms (runs: {', '.join(f'{t * 1000:.0f}' for t in times)})"

    print(f"bare Textual, one label, to first paint:  {runs(bare)}")
    print(f"modeldeck to first painted screen:        {runs(painted)}")
    print(f"modeldeck to catalog rows on screen:      {runs(rows)}")
    print(f"ratio first paint modeldeck / bare:       {statistics.median(painted) / statistics.median(bare):.2f} "
          "(target ≤ 1.5)")
    print(f"ratio catalog rows modeldeck / bare:      {statistics.median(rows) / statistics.median(bare):.2f}")


if __name__ == "__main__":
    main()
