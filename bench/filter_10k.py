"""One filter keystroke with 10,000 community rows (target < 50 ms), and the dashboard's peak memory
with them loaded (target < 150 MB). Run: python bench/filter_10k.py

Two figures per keystroke, over a sequence of typed and deleted characters (headless, 120x40):
- work: the time the UI thread spends on it: the filter handler plus rendering the table's lines;
- CPU: process CPU time per keystroke: everything Textual does for it (layout, compositor, styles), plus
  Pilot's overhead and the idle event-log poll, without the waits between frames;
- end to end: from Pilot's key press until the repainted screen is processed, which also includes
  Textual's frame pacing (it paints on a timer) and Pilot's own overhead.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import time

from common import add_synthetic_community_rows, fresh_home, percentile

ROWS = 10_000
KEYS = ["c", "h", "a", "t", "space", "m", "a", "backspace", "backspace", "t", "backspace", "backspace", "s", "q",
        "l", "backspace", "backspace", "backspace", "backspace", "backspace", "backspace", "backspace"] * 2


async def bare_input_baseline() -> float:
    """Pilot's end-to-end time for a keystroke into a lone Input: the floor of the end-to-end figure."""
    from textual.app import App
    from textual.widgets import Input

    class Bare(App):
        def compose(self):
            yield Input()

    times = []
    async with Bare().run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        for key in KEYS:
            start = time.perf_counter()
            await pilot.press(key)
            await pilot.pause()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


async def main() -> None:
    fresh_home()
    import engine
    from tui.app import ModelDeckApp
    from tui.screens.community import CommunityScreen
    from tui.widgets.live_table import LiveTable

    spent: list[float] = []

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        return wrapper

    CommunityScreen.on_input_changed = timed(CommunityScreen.on_input_changed)
    LiveTable.render_lines = timed(LiveTable.render_lines)

    db = engine.start()
    add_synthetic_community_rows(db, ROWS)
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        load_start = time.perf_counter()
        while not app.store.loaded:
            await pilot.pause(0.01)
        await pilot.pause()
        table = app.screen.query_one("#table", LiveTable)
        print(f"rows loaded and painted: {table.row_count} in {(time.perf_counter() - load_start) * 1000:.0f} ms")
        await pilot.press("slash")
        times, work, cpu = [], [], []
        for key in KEYS:
            spent.clear()
            cpu_start = time.process_time()
            start = time.perf_counter()
            await pilot.press(key)
            await pilot.pause()  # the refresh with the filtered rows has been processed
            times.append(time.perf_counter() - start)
            work.append(sum(spent))
            cpu.append(time.process_time() - cpu_start)
            visible = len(table.visible_keys)
        assert visible == table.row_count  # the filter is empty again at the end
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    baseline = await bare_input_baseline()
    print(f"filter keystroke over {ROWS:,} rows, work: median {statistics.median(work) * 1000:.1f} ms, "
          f"p95 {percentile(work, 0.95) * 1000:.1f} ms, max {max(work) * 1000:.1f} ms (target < 50 ms)")
    print(f"filter keystroke over {ROWS:,} rows, CPU: median {statistics.median(cpu) * 1000:.1f} ms, "
          f"p95 {percentile(cpu, 0.95) * 1000:.1f} ms")
    print(f"filter keystroke over {ROWS:,} rows, end to end: median {statistics.median(times) * 1000:.1f} ms, "
          f"p95 {percentile(times, 0.95) * 1000:.1f} ms; a lone Input under Pilot, same run: "
          f"{baseline * 1000:.1f} ms (ratio {statistics.median(times) / baseline:.2f})")
    print(f"peak memory (RSS) with {ROWS:,} rows: {peak_mb:.0f} MB (target < 150 MB)")


if __name__ == "__main__":
    asyncio.run(main())
