"""The GPU ledger on screen: the strip under the nav bar (a line per GPU at 120 columns, one compact line at
80, absent without a GPU), the GPU dialog (4) following each reading, and the load history of a deployment.
The readings are the engine's own types (what NVML would report), handed to the app in place of NVML."""

from __future__ import annotations

import pytest

from tests.tui_helpers import seed, two_gpus, wait_for
from tui.app import ModelDeckApp
from tui.widgets.gpu_strip import GpuStrip


def app_reading(db, readings) -> ModelDeckApp:
    app = ModelDeckApp(db, follow=False)
    app.gpu_reader = lambda _db: readings()
    return app


def dialog_text(dialog) -> str:
    """What the dialog's body shows, as plain text (it is a group of rich tables)."""
    from rich.console import Console

    console = Console(width=dialog.query_one("#gpus").size.width or 100, record=True, file=open("/dev/null", "w"))
    console.print(dialog.query_one("#gpus").content)  # what it shows now, as last updated
    return console.export_text()


def strip_text(app) -> str:
    return app.screen.query_one(GpuStrip).render().plain


async def test_without_a_gpu_there_is_no_strip_and_4_says_so(db):
    from engine.gpus import list_gpus
    from tui.screens.gpu_dialog import NO_GPU, GpuDialog

    if list_gpus():
        pytest.skip("this machine has GPUs")
    seed(db)
    app = ModelDeckApp(db, follow=False)
    app.gpu_reader = None  # NVML itself, which finds no GPU here
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.store.gpu_history is not None, what="the GPUs read once")
        for tab in "123":
            await pilot.press(tab)
            await pilot.pause()
            assert not app.screen.query_one(GpuStrip).display
        await pilot.press("4")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, GpuDialog) and app.screen)
        assert dialog_text(dialog).startswith(NO_GPU[:40])


async def test_the_strip_is_one_line_at_80_columns_and_a_line_per_gpu_at_120(db):
    seed(db)
    app = app_reading(db, two_gpus)
    async with app.run_test(size=(80, 24)) as pilot:
        strip = await wait_for(pilot, lambda: (s := app.screen.query_one(GpuStrip)).display and s)
        await pilot.pause()
        assert strip.size.height == 1
        assert strip_text(app) == " GPU 0 87% 40.0/79.6G support-bot │ 1 99% 76.2/79.6G bob  4: details"
        await pilot.press("3")  # every tab screen has it
        await wait_for(pilot, lambda: app.screen.query_one(GpuStrip).display, what="the strip on screen 3")
        await pilot.resize_terminal(120, 40)
        await pilot.pause(0.2)
        lines = strip_text(app).splitlines()
        assert app.screen.query_one(GpuStrip).size.height == 2 and len(lines) == 2
        assert lines[0].startswith(" GPU 0 H100 80GB HBM3 ") and "87%" in lines[0] and "40.0/79.6 GiB" in lines[0]
        assert "deployment support-bot 40.0 GiB" in lines[0]
        assert lines[1].endswith("pid 5151 (bob) 76.0 GiB")


async def test_eight_gpus_at_80_columns_are_packed_two_to_a_compact_line(db):
    import dataclasses

    seed(db)
    eight = [dataclasses.replace(s, gpu=dataclasses.replace(s.gpu, index=i)) for i in range(4) for s in two_gpus()]
    eight = [dataclasses.replace(s, gpu=dataclasses.replace(s.gpu, index=i)) for i, s in enumerate(eight)]
    app = app_reading(db, lambda: eight)
    async with app.run_test(size=(80, 24)) as pilot:
        strip = await wait_for(pilot, lambda: (s := app.screen.query_one(GpuStrip)).display and s)
        await pilot.pause()
        lines = strip_text(app).splitlines()
        assert strip.size.height == len(lines) == 4 and all(len(line) <= 80 for line in lines)
        assert [f"{i} " in "".join(lines) for i in range(8)] == [True] * 8 and lines[-1].endswith("4: details")


async def test_the_gpu_dialog_names_every_holder_and_follows_the_readings(db):
    from tui.app import GPUS_EVERY_S
    from tui.screens.gpu_dialog import GpuDialog

    seed(db)
    busy = iter(range(10, 100, 20))
    app = app_reading(db, lambda: two_gpus(busy=next(busy, 95)))
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.store.gpus, what="a first reading")
        await pilot.press("4")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, GpuDialog) and app.screen)
        text = dialog_text(dialog)
        for words in ("GPU 0  NVIDIA H100 80GB HBM3  ·  NVLink to GPU 1", "deployment support-bot", "40.0 GiB",
                      "bob", "5151", "torchrun --nproc-per-node 1 train.py", "power 402/700 W", "61°C"):
            assert words in text, words
        first = len(app.store.gpu_history.utilization[0])
        await wait_for(pilot, lambda: len(app.store.gpu_history.utilization[0]) > first, GPUS_EVERY_S * 3,
                       what="another reading")
        assert list(app.store.gpu_history.utilization[0])[:2] == [10, 30]
        await wait_for(pilot, lambda: "30%" in dialog_text(dialog), what="the dialog following")
        await pilot.press("escape")
        assert not isinstance(app.screen, GpuDialog)


def test_sparklines_scale_to_their_top_and_leave_unknown_readings_blank():
    from tui.widgets.sparkline import sparkline

    assert sparkline([0, 50, 100], 5, top=100).plain == "  ▁▅█"
    assert sparkline([None, 0, 5, 10], 4).plain == " ▁▅█"  # a MIG GPU's utilisation: not known, not 0
    assert sparkline([10, 20, 30, 40], 2).plain == "▆█"  # the last values, scaled to what is shown


@pytest.mark.gpu
async def test_the_strip_shows_this_machines_real_gpus(db):
    """On a GPU machine: NVML's readings on screen, a line per GPU at 120 columns (up to 8 GPUs at 40 rows)."""
    from engine.gpus import list_gpus

    gpus = list_gpus()
    app = ModelDeckApp(db, follow=False)
    app.gpu_reader = None  # NVML itself
    async with app.run_test(size=(120, 40)) as pilot:
        strip = await wait_for(pilot, lambda: (s := app.screen.query_one(GpuStrip)).display and s, 15)
        await pilot.pause()
        lines = strip_text(app).splitlines()
        if len(gpus) <= 8:
            assert strip.size.height == len(lines) == len(gpus)
            assert all(line.startswith(f" GPU {g.index} ") for line, g in zip(lines, gpus))
        assert all(f"/{g.memory_total_mb / 1024:.1f}" in strip_text(app) for g in gpus)
