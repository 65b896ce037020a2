"""Snapshots of every screen and dialog at 80x24 and 120x40 (pytest-textual-snapshot).

Update after an intended change with: pytest tests/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from tests.tui_helpers import seed, wait_for
from tui.app import ModelDeckApp

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


def app_for(db, seeded: bool = True) -> ModelDeckApp:
    if seeded:
        seed(db)
    return ModelDeckApp(db, follow=False)


def keys(*presses: str, then=None):
    async def run_before(pilot) -> None:
        await wait_for(pilot, lambda: pilot.app.store.loaded, what="data")
        await pilot.pause()
        for press in presses:
            await pilot.press(press)
            await pilot.pause()
        if then is not None:
            await then(pilot)
        await pilot.pause(0.1)

    return run_before


@pytest.mark.parametrize("size", SIZES)
class TestScreens:
    def test_community(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("down", "down"))

    def test_community_filtered(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("slash", *"qwen", "enter"))

    def test_custom(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "end"))

    def test_custom_empty(self, snap_compare, db, size):
        assert snap_compare(app_for(db, seeded=False), terminal_size=size, run_before=keys("2"))

    def test_deployments(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("3"))

    def test_deployments_empty(self, snap_compare, db, size):
        assert snap_compare(app_for(db, seeded=False), terminal_size=size, run_before=keys("3"))


@pytest.mark.parametrize("size", SIZES)
class TestDialogs:
    def test_help(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("question_mark"))

    def test_tag_picker(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("t", "down", "space"))

    def test_community_details(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("down", "down", "down", "d"))

    def test_custom_action_menu(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "end", "enter"))

    def test_custom_details(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "down", "d"))

    def test_confirm_delete(self, snap_compare, db, size):
        async def confirm_shown(pilot):
            from tui.screens.confirm import ConfirmDialog

            await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConfirmDialog), what="the dialog")

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "down", "down", "ctrl+d",
                                                                             then=confirm_shown))

    def test_import_with_error(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size,
                            run_before=keys("2", "i", *"/nowhere", "enter", "enter"))

    def test_deployment_details(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("3", "down", "d"))
