"""Job event written → row updated on screen, p95 (target < 300 ms). Run: python bench/live_latency.py

A separate process (standing in for a job) writes a model change and its event every 150 ms, stamping
the time of its commit; the dashboard (headless, Custom screen) records when the row's cell shows it.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import textwrap
import time

from common import fresh_home, percentile

UPDATES = 60
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from catalog import Database
    from catalog.schema import Model
    from engine.events import record
    db = Database(Path(sys.argv[1]))
    for i in range(1, int(sys.argv[3]) + 1):
        with db.write() as session:
            model = session.get(Model, int(sys.argv[2]))
            model.size_bytes = i * 1_000_000
            session.add(model)
            record(session, f"model:{model.id}", "updated")
        print(i, time.time(), flush=True)
        time.sleep(0.15)
""")


async def main() -> None:
    fresh_home()
    import engine
    from catalog.schema import Model, ModelState
    from tui.app import ModelDeckApp
    from tui.widgets.live_table import LiveTable

    db = engine.start()
    with db.write() as session:
        model = Model(name="watched", source="bench", state=ModelState.READY, size_bytes=0)
        session.add(model)
    app = ModelDeckApp(db)
    seen: dict[int, float] = {}
    original_upsert = LiveTable.upsert

    def upsert(self, key, cells):
        original_upsert(self, key, cells)
        size = app.store.models[key].model.size_bytes if key in app.store.models else None
        if size:
            seen.setdefault(size // 1_000_000, time.time())

    LiveTable.upsert = upsert
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("2")
        while not app.store.loaded:
            await pilot.pause(0.01)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db.path), str(model.id), str(UPDATES)],
                                  stdout=subprocess.PIPE, text=True)
        while writer.poll() is None or len(seen) < UPDATES:
            await pilot.pause(0.01)
            if writer.poll() is not None and time.time() > max(seen.values(), default=0) + 2:
                break
        written = dict((int(i), float(t)) for i, t in (line.split() for line in writer.stdout.read().splitlines()))
    latencies = [seen[i] - written[i] for i in written if i in seen]
    missing = len(written) - len(latencies)
    print(f"event written → row updated: p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms over "
          f"{len(latencies)} updates ({missing} never seen; target p95 < 300 ms)")


if __name__ == "__main__":
    asyncio.run(main())
