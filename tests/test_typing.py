"""Typing is never lost or moved: keys that reach the dashboard together (typed fast, sent by tmux, or
queued while it was busy) land where a person typing them one by one would have put them, whatever a
background check does in between. Each burst is posted at once, as a terminal delivers a burst."""

from __future__ import annotations

import asyncio

import pytest
from textual import events

from engine import models
from tests.tinydata import write_dataset
from tests.tui_helpers import wait_for
from tui.app import ModelDeckApp
from tui.screens.deploy_drawer import DeployDrawer
from tui.screens.endpoint_dialog import EndpointDialog
from tui.screens.finetune_dialog import FinetuneDialog

KEY_NAMES = {"tab", "enter", "escape"}
NAMED = {"\t": "tab", "/": "slash", ".": "full_stop", "-": "minus", ":": "colon", "_": "underscore"}


def burst(app, *keys: str) -> None:
    """Keys as a terminal hands over a burst: all in the app's queue before it handles the first. Each of
    `keys` is a key's name (tab, ctrl+s) or a run of characters."""
    for key in keys:
        if key in KEY_NAMES or "+" in key:
            app.post_message(events.Key(key, "\t" if key == "tab" else None))
            continue
        for char in key:
            app.post_message(events.Key(NAMED.get(char, char), char))


async def settled(pilot, app) -> None:
    await pilot.pause()
    await asyncio.sleep(0.1)
    await pilot.pause()


def value(app, field_id: str) -> str:
    return app.screen.query_one(f"#{field_id}").value


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.45, 0.8])
async def test_finetune_dialog_keeps_each_key_in_its_field_while_the_dataset_is_checked(db, tiny_model_dir,
                                                                                        tmp_path, delay):
    models.import_path(db, tiny_model_dir, "tiny")
    data = write_dataset(tmp_path, "sharegpt")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded, what="first load")
        await pilot.press("2")
        await pilot.pause()
        burst(app, "f", str(data))  # the letters typed right after opening the dialog are its first field's
        await wait_for(pilot, lambda: isinstance(app.screen, FinetuneDialog), what="the dialog")
        await asyncio.sleep(delay)  # the dataset check runs 0.4 s after the last key
        burst(app, "tab", "zz", "tab", "tab", "tab", "tab", "tab", "3")
        await settled(pilot, app)
        assert value(app, "dataset") == str(data)
        assert value(app, "name") == "zz"
        chain = [w.id for w in app.screen.focus_chain]
        fifth = chain[chain.index("name") + 5]  # the method, the modules, then the grid of numbers
        assert app.focused.id == fifth and value(app, fifth) == "3"
        typed = [w.id for w in app.screen.query("Input") if w.value]
        assert sorted(typed) == sorted(["dataset", "name", fifth])  # nothing typed twice or elsewhere
        await wait_for(pilot, lambda: "30 rows" in str(app.screen.query_one("#dataset-summary").render()),
                       what="the check of the dataset typed")


@pytest.mark.parametrize("delay", [0.0, 0.35, 0.8])
async def test_deploy_drawer_keeps_the_name_typed_while_the_plan_is_checked(db, tiny_model_dir, delay):
    models.import_path(db, tiny_model_dir, "tiny")
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded, what="first load")
        await pilot.press("2")
        await pilot.pause()
        burst(app, "p", "tab", "tab", "tab", "my-dep")  # from the backend, over the GPUs and the dtype
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen, what="the drawer")
        await asyncio.sleep(delay)  # the plan is asked for again 0.3 s after each change
        burst(app, "tab", "1")  # tensor parallel
        await settled(pilot, app)
        chain = [w.id for w in drawer.focus_chain]
        assert chain[chain.index("backend"):][:4] == ["backend", "gpus", "dtype", "name"]
        assert value(app, "name") == "my-dep"
        assert app.focused.id == chain[chain.index("name") + 1] and app.focused.value == "1"
        await wait_for(pilot, lambda: "Runs" in str(drawer.query_one("#plan").render()), what="the plan")
        assert value(app, "name") == "my-dep"


async def test_endpoint_dialog_fields_get_what_was_typed_into_them_in_one_burst(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded, what="first load")
        await pilot.press("3")
        await pilot.pause()
        burst(app, "a", "team", "tab", "http://127.0.0.1:9/v1", "tab", "tab", "MY_KEY")
        await wait_for(pilot, lambda: isinstance(app.screen, EndpointDialog), what="the dialog")
        await settled(pilot, app)
        assert [value(app, f) for f in ("name", "url", "model", "key_env")] == [
            "team", "http://127.0.0.1:9/v1", "", "MY_KEY"]
