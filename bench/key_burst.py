"""What keeping keys in order costs (tui/keys.py): a burst of 300 letters posted at once into the filter
bar, as a terminal hands over a paste or keys queued while the UI was busy, until the field holds them
all. The dashboard as shipped against the same dashboard without KeysInOrder, in turns, in one run.
Run: python bench/key_burst.py
"""

from __future__ import annotations

import asyncio
import statistics
import time

from common import fresh_home

KEYS = 300
ROUNDS = 5


async def burst(app_class) -> float:
    """Milliseconds per key, from the burst posted until the filter bar holds every letter."""
    from textual import events

    import engine

    db = engine.start()
    app = app_class(db)
    async with app.run_test(size=(120, 40)) as pilot:
        while not app.store.loaded:
            await pilot.pause(0.05)
        await pilot.press("slash")
        await pilot.pause()
        field = app.focused
        began = time.perf_counter()
        for _ in range(KEYS):
            app.post_message(events.Key("a", "a"))
        while len(field.value) < KEYS:
            await asyncio.sleep(0.001)
        spent = time.perf_counter() - began
    db.close()
    return spent / KEYS * 1000


async def main() -> None:
    fresh_home()
    from textual.app import App

    from tui.app import ModelDeckApp

    class Unordered(ModelDeckApp):
        async def on_event(self, event) -> None:  # Textual's own routing: KeysInOrder left out
            await App.on_event(self, event)

    ordered, unordered = [], []
    for _ in range(ROUNDS):  # in turns, so the machine's noise falls on both
        ordered.append(await burst(ModelDeckApp))
        unordered.append(await burst(Unordered))
    a, b = statistics.median(ordered), statistics.median(unordered)
    print(f"{KEYS} keys at once, median of {ROUNDS}: in order {a:.2f} ms/key, Textual's routing {b:.2f} ms/key "
          f"(ratio {a / b:.1f}; a person types a key every 100 ms or more)")


if __name__ == "__main__":
    asyncio.run(main())
