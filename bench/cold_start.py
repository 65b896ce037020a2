"""Cold start to first painted screen, median of 5 runs (target < 0.5 s).

Each run is a new Python process that opens the database, loads the curated catalog and paints the
Community screen (Textual's Ready event: the first screen has been drawn); the time is taken from
before the process starts until that event. Run: python bench/cold_start.py
"""

from __future__ import annotations

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


def main() -> None:
    fresh_home()
    subprocess.run([sys.executable, "-c", "import engine; engine.start()"], check=True)  # the database exists
    painted, rows = [], []
    for _ in range(6):
        start = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=os.environ,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        stamps = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("painted", "rows")))
        if len(stamps) != 2:
            sys.exit(out.stderr[-2000:])
        painted.append(float(stamps["painted"]) - start)
        rows.append(float(stamps["rows"]) - start)
    painted, rows = painted[1:], rows[1:]  # the first run warms the OS file cache
    print(f"cold start to first painted screen: median {statistics.median(painted) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{t * 1000:.0f}' for t in painted)} ms; target < 500 ms)")
    print(f"cold start to catalog rows on screen: median {statistics.median(rows) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{t * 1000:.0f}' for t in rows)} ms)")


if __name__ == "__main__":
    main()
