"""The dashboard driven with Pilot: every key and action of the three screens and their dialogs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
from sqlmodel import select

from catalog.schema import Model, ModelState
from engine import models
from tests.conftest import weights
from tests.hubserver import Repo
from tests.tui_helpers import seed, wait_for
from tui.app import ModelDeckApp
from tui.screens.action_menu import ActionMenu
from tui.screens.community import CommunityScreen
from tui.screens.confirm import ConfirmDialog
from tui.screens.custom import CustomScreen
from tui.screens.deployments import DeploymentsScreen
from tui.screens.details import DetailsDialog
from tui.screens.help import HelpDialog
from tui.screens.import_dialog import ImportDialog
from tui.screens.tag_picker import TagPicker
from tui.widgets.live_table import LiveTable
from tui.widgets.log_view import FollowingLog

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def table(app) -> LiveTable:
    return app.screen.query_one("#table", LiveTable)


async def loaded(pilot):
    await wait_for(pilot, lambda: pilot.app.store.loaded, what="first load")
    await pilot.pause()


def plain(cell) -> str:
    return cell.plain if hasattr(cell, "plain") else str(cell)


async def test_keys_1_2_3_switch_between_the_three_screens(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        assert isinstance(app.screen, CommunityScreen)
        await pilot.press("2")
        assert isinstance(app.screen, CustomScreen)
        await pilot.press("3")
        assert isinstance(app.screen, DeploymentsScreen)
        await pilot.press("1")
        assert isinstance(app.screen, CommunityScreen)


async def test_filter_matches_name_description_and_tags_as_you_type(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        total = table(app).row_count
        assert total >= 30 and len(table(app).visible_keys) == total
        await pilot.press("slash", *"coder")
        assert "bigcode/starcoder2-3b" in table(app).visible_keys
        await pilot.press("home", *"qwen ")
        assert table(app).visible_keys == ["Qwen/Qwen2.5-Coder-1.5B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct"]
        await pilot.press("end", *" 7b")
        assert table(app).visible_keys == ["Qwen/Qwen2.5-Coder-7B-Instruct"]
        await pilot.press("ctrl+u", *"thinking")  # a word from a description
        assert "Qwen/Qwen3-0.6B" in table(app).visible_keys
        await pilot.press("ctrl+u", *"embedding")  # a tag
        assert {app.store.community[k].task for k in table(app).visible_keys} == {"embedding"}
        await pilot.press("escape")
        assert len(table(app).visible_keys) == total and app.focused is table(app)


async def test_tag_picker_narrows_to_models_with_every_chosen_tag(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("t")
        picker = app.screen
        assert isinstance(picker, TagPicker)
        from textual.widgets import SelectionList

        selection = picker.query_one(SelectionList)
        selection.select("code")
        selection.select("4-15B")
        await pilot.pause()
        lines = {option.value: selection.render_line(i).text for i, option in enumerate(selection.options)
                 if i < selection.size.height}
        assert {"code", "4-15B"} & set(lines)  # a ticked row is on screen
        for value, line in lines.items():  # ticked or not, told by shape: no colour needed
            assert ("✓" in line[:3]) == (value in {"code", "4-15B"}), line
        assert "enter apply" in str(picker.query_one(".dialog-hint").render())
        await pilot.press("enter")
        keys = table(app).visible_keys
        assert keys and all({"code", "4-15B"} <= set(app.store.community[k].tags) for k in keys)
        assert "Qwen/Qwen2.5-Coder-1.5B-Instruct" not in keys
        assert "Tags: 4-15B, code" in str(app.screen.query_one("#tags-line").render())
        await pilot.press("t", "c", "enter")  # clear all
        assert len(keys) < len(table(app).visible_keys) == table(app).row_count


async def test_download_from_community_goes_pending_with_progress_then_ready(db, hub):
    hub.repos[SMOL] = Repo({"config.json": b'{"model_type": "llama"}', "model.safetensors": weights(24 * 1024 * 1024),
                           "tokenizer.json": b"{}"})
    hub.bytes_per_second = 8_000_000
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        assert table(app).cursor_key == SMOL
        assert plain(table(app).cells(SMOL)[-1]) == "Download"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.store.model_for_repo(SMOL), what="the custom model row")
        await pilot.press("2")
        custom = table(app)
        model_id = app.store.model_for_repo(SMOL).model.id
        await wait_for(pilot, lambda: "%" in plain(custom.cells(model_id)[2]), what="live progress in the row")
        assert plain(custom.cells(model_id)[2]).startswith("Pending")
        await wait_for(pilot, lambda: plain(custom.cells(model_id)[2]) == "Ready", timeout=30, what="Ready")
        await pilot.press("1")
        assert plain(table(app).cells(SMOL)[-1]) == "Ready"
        await pilot.press("enter")  # a downloaded model's row action is Deploy: the drawer for it
        from tui.screens.deploy_drawer import DeployDrawer

        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen, what="drawer")
        assert drawer.model_id == model_id


DASHBOARD = textwrap.dedent("""
    import asyncio, time
    from tui.app import ModelDeckApp

    async def main():
        app = ModelDeckApp()
        async with app.run_test(size=(80, 24)) as pilot:
            while not app.store.loaded:
                await pilot.pause(0.05)
            await pilot.press("enter")  # Download on the first row
            while not app.store.model_for_repo("%s"):
                await pilot.pause(0.05)
            print("downloading", flush=True)
            time.sleep(3600)  # until killed

    asyncio.run(main())
""" % SMOL)


async def test_killing_the_dashboard_does_not_stop_a_download(db, hub):
    hub.repos[SMOL] = Repo({"config.json": b"{}", "model.safetensors": weights(24 * 1024 * 1024), "tokenizer.json": b"{}"})
    hub.bytes_per_second = 12_000_000
    dashboard = subprocess.Popen([sys.executable, "-c", DASHBOARD], stdout=subprocess.PIPE, text=True)
    try:
        assert dashboard.stdout.readline().strip() == "downloading"
    finally:
        dashboard.kill()  # like a dropped SSH session: no chance to clean up
        dashboard.wait()
    reopened = ModelDeckApp(db)
    async with reopened.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        model_id = reopened.store.model_for_repo(SMOL).model.id
        await wait_for(pilot, lambda: plain(table(reopened).cells(model_id)[2]) == "Ready", timeout=30, what="Ready")


async def test_custom_action_menu_details_and_confirmed_delete(db, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "local-tiny")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 1)
        await pilot.press("enter")
        assert isinstance(app.screen, ActionMenu)
        await pilot.press("enter")  # first item: Show details
        details = app.screen
        assert isinstance(details, DetailsDialog)
        shown = dict((k, plain(v)) for k, v in details.fields)
        assert shown["Path"] == str(tiny_model_dir) and shown["Lineage"] == "local-tiny (a base model)"
        await pilot.press("escape")
        await pilot.press("ctrl+d")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen)
        assert "Delete local-tiny?" in dialog.title_text and "stay where they are" in dialog.message
        await pilot.press("n")  # the safe answer first: nothing happens
        assert table(app).row_count == 1
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog))
        await pilot.press("y")
        await wait_for(pilot, lambda: table(app).row_count == 0, what="the row to go")
        with db.read() as session:
            assert session.exec(select(Model)).all() == []
        assert tiny_model_dir.exists()


async def test_delete_is_refused_naming_what_depends_on_the_model(db):
    ids = seed(db)
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 5)
        assert table(app).move_to_key(ids["base"])
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: app._notifications, what="a notification")
        message = list(app._notifications)[-1].message
        assert "adapter 'support-bot-lora' is built on it" in message
        assert "merged 'support-bot-merged' is built on it" in message
        assert "deployments 'support-bot', 'qwen-small' serve it: stop them first" in message
        assert not isinstance(app.screen, ConfirmDialog)
        with db.read() as session:
            assert session.get(Model, ids["base"]) is not None


async def test_details_show_lineage_of_an_adapter(db):
    ids = seed(db)
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 5)
        table(app).move_to_key(ids["adapter"])
        await pilot.press("d")
        fields = dict((k, plain(v)) for k, v in app.screen.fields)
        assert fields["Lineage"] == "Qwen2.5-0.5B-Instruct → support-bot-lora"
        assert fields["Dataset"] == "/data/support.jsonl" and fields["Rank"] == "16"


async def test_details_drawer_and_dialog_tell_only_what_holds(db, tmp_path):
    """A base model's link once; a finished fine-tune's details not 'live'; no vLLM-only fields where vLLM
    cannot run; the fine-tune dialog's file picker starts where the last dataset was."""
    from tests.tinydata import write_dataset
    from tests.tui_helpers import seed_training
    from tui.screens.deploy_drawer import VLLM_ONLY, DeployDrawer
    from tui.screens.details import TrainingDetails
    from tui.screens.file_picker import FilePicker
    from tui.screens.finetune_dialog import FinetuneDialog

    ids = seed_training(db, seed(db))
    with db.write() as session:
        base = session.get(Model, ids["base"])
        base.meta_json = Model.dumps({"link": "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct"})
        session.add(base)
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 6)
        table(app).move_to_key(ids["base"])
        await pilot.press("d")
        fields = [k for k, _ in app.screen.fields]
        assert fields.count("Link") == 1
        await pilot.press("escape")
        table(app).move_to_key(ids["adapter"])  # Ready: its fine-tune is over
        await pilot.press("d")
        details = await wait_for(pilot, lambda: isinstance(app.screen, TrainingDetails) and app.screen)
        assert "live while it trains" not in str(details.query_one("#hint").render())
        await pilot.press("escape")
        table(app).move_to_key(ids["training"])  # this one trains now
        await pilot.press("d")
        details = await wait_for(pilot, lambda: isinstance(app.screen, TrainingDetails) and app.screen)
        assert "live while it trains" in str(details.query_one("#hint").render())
        await pilot.press("escape")
        table(app).move_to_key(ids["base"])
        await pilot.press("p")
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen.is_mounted
                                and app.screen)
        await pilot.pause()
        assert all(not drawer.query_one(f"#{field}-row").display for field in VLLM_ONLY)  # no vLLM here
        await pilot.press("escape")
        (tmp_path / "sets").mkdir()
        data = write_dataset(tmp_path / "sets", "alpaca")
        app.dataset_folder = None
        await pilot.press("f")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, FinetuneDialog) and app.screen.is_mounted
                                and app.screen)
        dialog.query_one("#dataset").value = str(data)
        await wait_for(pilot, lambda: "30 rows" in str(dialog.query_one("#dataset-summary").render()),
                       what="the dataset read")
        await pilot.press("escape")
        await pilot.press("f")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, FinetuneDialog) and app.screen.is_mounted
                                and app.screen)
        await pilot.press("ctrl+o")
        picker = await wait_for(pilot, lambda: isinstance(app.screen, FilePicker) and app.screen)
        assert picker.folder == tmp_path / "sets"


async def test_at_80_columns_names_that_share_a_start_stay_apart(db, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "SmolLM2-135M-Instruct")
    models.import_path(db, tiny_model_dir, "SmolLM2-135M-Instruct-pirate-lora")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 2)
        await pilot.pause()
        names = [table(app).render_line(y).text.split()[0] for y in (1, 2)]  # under the header
        assert names[0] != names[1] and names[1].endswith("lora"), names  # the end that tells them apart


async def test_failed_row_shows_the_reason_and_retry_is_offered(db, hub):
    ids = seed(db)
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 5)
        table(app).move_to_key(ids["failed"])
        await pilot.pause()
        preview = str(app.screen.query_one("#preview").render())
        assert "Failed: meta-llama/Llama-3.2-1B-Instruct is gated" in preview
        await pilot.press("enter")
        labels = [label for _, label in app.screen.actions]
        assert labels == ["Show details  d", "Retry download  r", "Delete  ctrl+d"]


async def test_import_dialog_reports_a_bad_path_and_keeps_what_was_typed(db, tmp_path, tiny_model_dir):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "i")
        assert isinstance(app.screen, ImportDialog)
        bad = str(tmp_path / "nothing-here")
        await pilot.press(*bad, "enter")
        error = str(app.screen.query_one("#error").render())
        assert "no such folder" in error
        assert app.screen.query_one("#path").value == bad
        path_input = app.screen.query_one("#path")
        path_input.value = str(tiny_model_dir)
        app.screen.query_one("#name").value = "imported"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CustomScreen) and table(app).row_count == 1)
        row = app.store.models[table(app).visible_keys[0]]
        assert row.model.name == "imported" and row.model.state == ModelState.READY


async def test_a_dialogs_buttons_run_its_action_or_close_it(db, tmp_path):
    """Clicked, not keyed: the primary button runs the dialog's action (here: the import's check), Cancel
    closes the dialog with nothing done."""
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "i")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, ImportDialog) and app.screen)
        dialog.query_one("#path").value = str(tmp_path / "nothing-here")
        await pilot.click("#import")
        await wait_for(pilot, lambda: "no such folder" in str(dialog.query_one("#error").render()), what="the check")
        assert app.screen is dialog
        await pilot.click("#cancel")
        await wait_for(pilot, lambda: isinstance(app.screen, CustomScreen), what="the dialog to close")
        assert app.store.models == {}


async def test_form_dialogs_say_what_the_focused_field_is_for(db):
    from engine.hyperparameters import Hyperparameters
    from tui.screens.deploy_drawer import TYPED, DeployDrawer
    from tui.screens.finetune_dialog import FinetuneDialog

    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        rank_help = next(f.metadata["help"] for f in Hyperparameters.fields() if f.name == "rank")
        port_help = next(help_text for field_id, _, help_text in TYPED if field_id == "port")
        for dialog, field, text in ((FinetuneDialog(), "#rank", rank_help), (DeployDrawer(0), "#port", port_help)):
            app.push_screen(dialog)
            await wait_for(pilot, lambda d=dialog: app.screen is d, what="the dialog")
            await pilot.pause()  # mounted, not only on top
            dialog.query_one(field).focus()
            await wait_for(pilot, lambda d=dialog, t=text: t in str(d.query_one("#field-help").render()),
                           what=f"the help of {field}")
            app.pop_screen()


async def test_cancel_from_custom_ends_the_download(db, hub):
    hub.bytes_per_second = 2_000_000
    model, job = models.pull(db, "org/big")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: "%" in plain(table(app).cells(model.id)[2]), what="progress")
        await pilot.press("x")
        await wait_for(pilot, lambda: plain(table(app).cells(model.id)[2]) == "Cancelled", timeout=15,
                       what="Cancelled (not Failed: it was asked for)")
        assert "cancelled" in app.store.models[model.id].model.reason
        toast = list(app._notifications)[-1]  # the outcome is announced wherever the user is looking
        # asked for, so a warning, not an error
        assert toast.title == "big" and toast.severity == "warning" and toast.message == "download cancelled"


async def test_x_on_a_job_that_has_run_long_asks_before_cancelling_it(db):
    from engine import jobs

    ids = seed(db)  # its download has run since the seed's clock, long ago
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 5)
        table(app).move_to_key(ids["pending"])
        await pilot.press("x")
        question = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen)
        assert "Cancel the download of SmolLM2-1.7B-Instruct?" in question.title_text and "It has run" in question.message
        await pilot.press("n")
        await pilot.pause()
        job = app.store.models[ids["pending"]].job
        assert jobs.get(db, job.id).state.value == "running"  # kept


async def test_copy_keys_put_the_link_or_path_on_the_clipboard(db, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "local-tiny")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("y")
        assert app.clipboard == f"https://huggingface.co/{SMOL}"
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 1)
        await pilot.press("y")
        assert app.clipboard == str(tiny_model_dir)


def footer_keys(app) -> list[str]:
    """The footer's keys as shown: 'm Merge', '? Keys'."""
    from textual.widgets._footer import FooterKey

    return [f"{app.get_key_display(app.screen.active_bindings[key.key].binding)} {key.description}".strip()
            for key in app.screen.query(FooterKey) if not key.has_class("-command-palette")]


async def test_the_footer_shows_the_keys_of_the_selected_row_whole_at_80_columns(db):
    seed(db)
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.pause(0.1)
        community = footer_keys(app)
        assert community[0] == "⏎ Action" and community[-2:] == ["? Keys", "q Quit"], community
        assert sum(len(k) + 1 for k in community) + len("▏^p palette") <= 80, community
        await pilot.press("2")
        shown = {}
        for _ in range(table(app).row_count):
            name = plain(table(app).cells(table(app).cursor_key)[0])
            await pilot.pause(0.1)
            shown[name] = footer_keys(app)
            await pilot.press("down")
        adapter, base, failed = shown["support-bot-lora"], shown["Qwen2.5-0.5B-Instruct"], shown["Llama-3.2-1B-Instruct"]
        assert "m Merge" in adapter and "m Merge" not in base and "f Fine-tune" in base
        assert "r Retry" in failed and "p Deploy" not in failed and "r Retry" not in base
        for keys in shown.values():
            assert keys[-2:] == ["? Keys", "q Quit"] and keys[0] == "⏎ Actions"
            assert sum(len(k) + 1 for k in keys) + len("▏^p palette") <= 80, keys  # nothing cut

        await pilot.press("3")
        shown = {}
        for _ in range(table(app).row_count):
            dep = app.screen._selected()
            await pilot.pause(0.1)
            shown[dep.state.value] = footer_keys(app)
            await pilot.press("down")
        assert "c Chat" in shown["ready"] and "x Stop" in shown["ready"] and "^d Delete" not in shown["ready"]
        assert "c Chat" not in shown["failed"] and "^d Delete" in shown["failed"] and "r Start again" in shown["failed"]
        assert "x Stop" in shown["pending"] and "r Start again" not in shown["pending"]
        for keys in shown.values():
            assert keys[-2:] == ["? Keys", "q Quit"]
            assert sum(len(k) + 1 for k in keys) + len("▏^p palette") <= 80, keys


async def test_every_key_of_every_screen_has_its_action(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        for key in "123":
            await pilot.press(key)
            for binding in app.screen.BINDINGS:
                name = binding.action.split("(")[0]
                assert callable(getattr(app.screen, f"action_{name}", None)), (app.screen, binding.action)


def shown(log) -> list[str]:
    """The log's lines as they are on screen (wrapped)."""
    return [strip.text.rstrip() for strip in log.lines]


async def test_a_long_log_line_wraps_to_the_dialog_at_80_columns(db, tmp_path):
    from tui.screens.log_dialog import LogDialog

    words = " ".join(f"word{i}" for i in range(40))  # about 270 characters
    log_path = tmp_path / "job.log"
    log_path.write_text(f"first line\nOSError: cannot write /very/long/path: {words} END\nlast\n")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        app.push_screen(LogDialog("a job", str(log_path)))
        log = await wait_for(pilot, lambda: isinstance(app.screen, LogDialog)
                             and next(iter(app.screen.query(FollowingLog)), None))
        lines = await wait_for(pilot, lambda: len(shown(log)) > 3 and shown(log), what="the lines")
        assert all(len(line) <= log.size.width for line in lines)
        assert lines[0] == "first line" and lines[-1] == "last"
        assert " ".join(lines[1:-1]).split() == f"OSError: cannot write /very/long/path: {words} END".split()


async def test_l_shows_the_log_of_the_models_job_as_it_grows(db, hub):
    from tui.screens.log_dialog import LogDialog

    hub.bytes_per_second = 8_000_000
    model, job = models.pull(db, "org/big")
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 1)
        await pilot.press("l")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, LogDialog) and app.screen)
        log = dialog.query_one(FollowingLog)
        await wait_for(pilot, lambda: any("started: download org/big" in line for line in shown(log)), what="the start")
        await wait_for(pilot, lambda: any("job succeeded" in line for line in shown(log)), timeout=30,
                       what="lines written after the dialog opened")
        await pilot.press("escape")
        assert isinstance(app.screen, CustomScreen)


async def test_help_shows_the_keys_of_the_current_screen(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "question_mark")
        assert isinstance(app.screen, HelpDialog)
        assert app.screen.for_screen.TAB_TITLE == "Custom"
        await pilot.press("escape")
        assert isinstance(app.screen, CustomScreen)


async def test_every_screen_action_is_in_the_command_palette(db):
    seed(db)  # rows to act on
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        screens = (("1", CommunityScreen), ("2", CustomScreen), ("3", DeploymentsScreen))
        for key, screen_type in screens:
            await pilot.press(key)
            titles = {c.title for c in app.get_system_commands(app.screen)}
            for _, every in screens:  # every screen's actions, wherever the palette is opened
                for binding in every.BINDINGS:
                    assert f"{every.TAB_TITLE}: {binding.description}" in titles
                assert (f"Go to {every.TAB_TITLE}" in titles) == (every is not screen_type)
            assert {"Keys", "Quit"} <= titles and len([t for t in titles if t == "Quit"]) == 1
        await pilot.press("ctrl+p")  # on Active deployments: Custom's merge, found by name, runs on Custom
        await pilot.pause()
        for char in "merge":
            await pilot.press(char)
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, CustomScreen), what="Custom")
        await wait_for(pilot, lambda: any("Merge works on a Ready adapter" in str(n.message)
                                          for n in app._notifications), what="merge's own answer on Custom")


async def test_deployments_table_filters_by_text_and_state(db):
    seed(db)
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: table(app).row_count == 3)
        names = lambda: [app.store.deployments[k].name for k in table(app).visible_keys]  # noqa: E731
        await pilot.press("s")  # pending
        assert names() == ["qwen-small"]
        await pilot.press("s", "s")  # failed
        assert names() == ["broken"]
        await pilot.press("s", "s")  # all
        await pilot.press("slash", *"8001", "enter")
        assert names() == ["support-bot"]
        await pilot.press("d")
        from tui.screens.details import LiveDetails

        await wait_for(pilot, lambda: isinstance(app.screen, LiveDetails), what="the details")
        fields = dict((k, plain(v)) for k, v in app.screen.fields)
        assert fields["API key"] == "sk-md-…ef" and fields["Endpoint"] == "http://127.0.0.1:8001/v1"


async def test_deployments_empty_state_says_how_to_deploy(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("3")
        assert "No deployments yet" in table(app).empty_text and "Custom (2)" in table(app).empty_text


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from catalog import Database
    from catalog.schema import Model
    from engine.events import record
    db = Database(Path(sys.argv[1]))
    with db.write() as session:
        model = session.get(Model, int(sys.argv[2]))
        model.size_bytes = 123_456_789
        session.add(model)
        record(session, f"model:{model.id}", "updated")
""")


async def test_a_change_written_by_another_process_shows_up_live(db, tiny_model_dir):
    model, _ = models.import_path(db, tiny_model_dir, "watched")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 1)
        subprocess.run([sys.executable, "-c", WRITER, str(db.path), str(model.id)], check=True)
        await wait_for(pilot, lambda: plain(table(app).cells(model.id)[3]) == "123.5 MB", timeout=1.0,
                       what="the row to follow the database (bench/live_latency.py measures the latency)")


async def test_a_change_that_arrives_as_the_dashboard_quits_is_dropped(db, tiny_model_dir):
    """Quitting takes the screens' widgets down before the screens; a change read just before is then
    delivered to screens with no table. It must not end the app with an error."""
    from tui.messages import DeploymentsChanged, ModelsChanged

    model, _ = models.import_path(db, tiny_model_dir, "late")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await app.screen.remove_children()  # as the app's shutdown does, screen by screen
        app.exit()
        app.on_models_changed(ModelsChanged(models.model_rows(db, {model.id}), set()))
        app.on_deployments_changed(DeploymentsChanged([], set()))
    assert app.return_code in (0, None)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_every_column_and_the_footer_fit_at_small_and_large_sizes(db, size):
    seed(db)
    app = ModelDeckApp(db)
    async with app.run_test(size=size) as pilot:
        await loaded(pilot)
        for key in "123":
            await pilot.press(key)
            await pilot.pause()
            widths = table(app)._column_widths()
            assert all(w >= 4 for w in widths) and sum(widths) + len(widths) <= size[0]


async def test_without_a_database_the_app_opens_the_default_one_after_painting(isolated):
    app = ModelDeckApp()  # what `modeldeck` with no verb runs
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        assert app.db is not None and app.db.path == isolated / "modeldeck.db"
        assert table(app).row_count >= 30


async def test_a_bad_home_ends_the_app_with_the_reason(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MODELDECK_HOME", str(blocker / "home"))
    app = ModelDeckApp()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.return_code == 1, what="the app to give up")
    assert app.return_code == 1


async def test_a_damaged_database_ends_the_app_with_the_reason(isolated, tiny_model_dir):
    from tests.test_db import damaged_database

    path = damaged_database(tiny_model_dir)
    try:
        app = ModelDeckApp()
        said, exit_app = [], app.exit
        app.exit = lambda *args, **kwargs: (said.append(kwargs.get("message")), exit_app(*args, **kwargs))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.return_code == 1, what="the app to give up")
        assert "is damaged (database disk image is malformed)" in said[0]
    finally:
        path.unlink()


async def test_a_live_update_repaints_its_row_when_the_table_is_scrolled(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("end")  # scrolled to the bottom; the cursor on the last row
        keys = table(app).visible_keys
        watched = keys[-3]  # on screen, not under the cursor
        assert table(app).scroll_y > 0
        with db.write() as session:
            from engine.events import record

            model = Model(name="watched", source=f"hub:{watched}", repo_id=watched, state=ModelState.READY)
            session.add(model)
            session.flush()
            record(session, f"model:{model.id}", "created")
        await wait_for(pilot, lambda: plain(table(app).cells(watched)[-1]) == "Ready", what="the data")
        await pilot.pause(0.1)
        screen_text = app.export_screenshot()
        assert "Ready" in screen_text, "the row's new state was not painted"


def set_input(app, widget_id: str, value: str) -> None:
    from textual.widgets import Input

    app.screen.query_one(f"#{widget_id}", Input).value = value


async def test_finetune_from_the_dialog_runs_live_in_custom_then_merges(db, tiny_model_dir, tmp_path):
    """A real fine-tune of the tiny model, started from the dialog: the adapter is Pending at once with
    its progress and loss in its row, its details draw the loss curve, then it is Ready and merges."""
    from tests.tinydata import write_dataset
    from tui.screens.details import TrainingDetails
    from tui.screens.finetune_dialog import FinetuneDialog
    from tui.widgets.loss_chart import LossChart

    models.import_path(db, tiny_model_dir, "tiny")
    data = write_dataset(tmp_path, "sharegpt")
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "f")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, FinetuneDialog) and app.screen)
        assert dialog.query_one("#base").value == app.store.models[1].model.id  # the only eligible base
        set_input(app, "dataset", str(data))
        await wait_for(pilot, lambda: "30 rows, ShareGPT: 28 train, 2 validation" in str(dialog.query_one("#dataset-summary").render()),
                       what="the dataset summary")
        await wait_for(pilot, lambda: "over 128 (cut)" in str(dialog.query_one("#token-summary").render()), 60,
                       what="token counts with the model's own limit")
        for name, value in {"name": "sharegpt-lora", "max_steps": "400", "batch_size": "4", "grad_accum": "1",
                            "learning_rate": "0.01", "val_split": "0"}.items():
            set_input(app, name, value)

        def estimate() -> str:
            return str(app.screen.query_one("#estimate").render())

        # Nothing has run on this base yet: a guess from this CPU's speed, for the settings as typed now
        await wait_for(pilot, lambda: dialog._counted is not None, 30, what="the count")
        tokens = 400 * 4 * dialog._counted[2].stats.mean_trained  # the steps typed, not the default epochs
        await wait_for(pilot, lambda: f"a guess from this CPU's speed: {tokens:,.0f} tokens at about" in estimate(), 30,
                       what="the guessed time")
        assert re.match(r"⏱ about \d+(m\d\ds|s) of training \(", estimate()), estimate()
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, CustomScreen), 30, what="the dialog to close")
        adapter = next(r.model for r in app.store.models.values() if r.model.name == "sharegpt-lora")
        assert table(app).cursor_key == adapter.id

        def state_cell() -> str:
            return plain(table(app).cells(adapter.id)[2])

        await wait_for(pilot, lambda: "loss" in state_cell() and "%" in state_cell(), 60, what="live loss in the row")
        await pilot.press("d")
        details = await wait_for(pilot, lambda: isinstance(app.screen, TrainingDetails) and app.screen)
        chart = details.query_one(LossChart)
        await wait_for(pilot, lambda: len(chart.curves[0]) >= 3, 60, what="the curve to grow")
        await pilot.press("escape")
        await wait_for(pilot, lambda: state_cell() == "Ready", 120, what="the adapter to be Ready")
        await pilot.press("m")
        await wait_for(pilot, lambda: any(r.model.name == "sharegpt-lora-merged" and r.model.state == ModelState.READY
                                          for r in app.store.models.values()), 120, what="the merged model")

        # The next run on this base is timed from the speed the last one measured
        from engine import jobs

        measured = json.loads(jobs.get(db, adapter.job_id).metrics_json)["tokens_per_s"]
        await pilot.press("f")
        await wait_for(pilot, lambda: isinstance(app.screen, FinetuneDialog))
        app.screen.query_one("#base").value = app.store.models[1].model.id  # tiny, not the merged model
        set_input(app, "dataset", str(data))
        await wait_for(pilot, lambda: f"{measured:,.0f} tokens/s, as job {adapter.job_id} ran" in estimate(), 60,
                       what="the measured time")


async def test_deploy_drawer_tells_merged_from_adapter_and_follows_a_download_that_fails(db):
    from engine import lifecycle
    from tui.screens.deploy_drawer import DeployDrawer

    ids = seed(db)
    with db.read() as session:
        merged = session.exec(select(Model).where(Model.name == "support-bot-merged")).one().id
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        await wait_for(pilot, lambda: table(app).row_count == 5)
        for key, said, not_said in ((ids["adapter"], "served on its base Qwen2.5-0.5B-Instruct", "merged from"),
                                    (merged, "merged from Qwen2.5-0.5B-Instruct", "served on its base")):
            table(app).move_to_key(key)
            await pilot.press("p")
            drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen.is_mounted
                                    and app.screen)
            about = str(drawer.query_one("#about").render())
            assert said in about and not_said not in about  # a merged model stands alone
            await pilot.press("escape")
        app.open_deploy(ids["pending"])  # as Community's Deploy does for a model still downloading
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen.is_mounted
                                and app.screen)
        await wait_for(pilot, lambda: "still downloading" in str(drawer.query_one("#plan").render()), what="the plan")
        with db.write() as session:  # as the download's own process would
            lifecycle.fail_model(session, ids["pending"], "the Hub answered 404")
        await wait_for(pilot, lambda: "is failed" in str(drawer.query_one("#error").render()), what="the refusal")
        assert "still downloading" not in str(drawer.query_one("#plan").render())
        assert "Failed: the Hub answered 404" in str(drawer.query_one("#about").render())


async def test_finetune_dialog_shows_the_bad_line_and_keeps_everything_typed(db, tiny_model_dir, tmp_path):
    from tests.tinydata import write_jsonl
    from tui.screens.finetune_dialog import FinetuneDialog

    models.import_path(db, tiny_model_dir, "tiny")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "f")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, FinetuneDialog) and app.screen)
        set_input(app, "dataset", str(bad))
        set_input(app, "rank", "8")
        await wait_for(pilot, lambda: "line 2: missing field 'output'" in str(dialog.query_one("#dataset-summary").render()),
                       what="the bad line")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: "line 2" in str(dialog.query_one("#error").render()), 30, what="the refusal")
        assert app.screen is dialog and dialog.query_one("#rank").value == "8"
        good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "a", "output": "b"}] * 4)
        set_input(app, "dataset", str(good))
        await wait_for(pilot, lambda: "4 rows" in str(dialog.query_one("#dataset-summary").render()), what="the check")
        assert str(dialog.query_one("#error").render()).strip() == ""  # the refusal of the old file is gone
        set_input(app, "dataset", str(bad))
        set_input(app, "rank", "-1")
        await pilot.pause()
        assert dialog.query_one("#rank").has_class("-invalid") and "above 0" in str(dialog.query_one("#error").render())
        with db.read() as session:
            assert [m.name for m in session.exec(select(Model))] == ["tiny"]


async def test_a_failing_operation_of_a_screen_is_shown_not_swallowed(db, tiny_model_dir):
    models.import_path(db, tiny_model_dir, "tiny")
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        app.screen.merge("tiny")  # the worker behind `m`, on a model that is not an adapter
        await wait_for(pilot, lambda: any("only an adapter can be merged" in n.message for n in app._notifications),
                       what="the refusal on screen")


async def test_finetune_from_community_asks_before_downloading(db):
    app = ModelDeckApp(db)
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        await pilot.press("f")  # the first row: SmolLM2 135M, not downloaded
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen)
        assert dialog.title_text.startswith("Download SmolLM2")
        await pilot.press("n")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog)
        with db.read() as session:
            assert session.exec(select(Model)).all() == []  # nothing started


async def test_a_deployment_made_from_the_shell_goes_ready_on_screen_then_stops_and_is_deleted(db, tiny_model_dir):
    from catalog.schema import DeploymentState
    from engine import deployments
    from engine.backends import DeploySettings
    from tui.screens.deploy_drawer import DeployDrawer
    from tui.screens.log_dialog import LogDialog

    models.import_path(db, tiny_model_dir, "tiny")
    deployment, _ = deployments.deploy(db, "tiny", DeploySettings())
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("3")

        def state() -> str:
            return plain(table(app).cells(deployment.id)[3])

        await wait_for(pilot, lambda: state().startswith("Pending"), what="Pending on screen")
        await wait_for(pilot, lambda: state() == "Ready", 120, what="Ready on screen")
        from openai import OpenAI

        ready = deployments.deployment_rows(db, {deployment.id})[0]
        await wait_for(pilot, lambda: deployment.id in app.store.load, 10, what="a first reading of its load")
        OpenAI(base_url=ready.endpoint, api_key=ready.api_key, max_retries=0).completions.create(
            model="tiny", prompt="hi", max_tokens=3)
        # requests and tokens/s come from the server's /metrics: the warm-up and this one (the listing the
        # SDK does not send, and the supervisor's /health, are not load)
        await wait_for(pilot, lambda: plain(table(app).cells(deployment.id)[4]) == "2", 15, what="the request count")
        await wait_for(pilot, lambda: any(b in plain(table(app).cells(deployment.id)[5]) for b in "▂▃▄▅▆▇█"), 15,
                       what="the tokens of that request on the Tok/s line")
        from tui.screens.details import DeploymentDetails
        from tui.widgets.load_chart import LoadChart

        await pilot.press("d")
        chart = await wait_for(pilot, lambda: isinstance(app.screen, DeploymentDetails) and
                               app.screen.query_one(LoadChart), what="the details' load chart")
        history = app.store.load[deployment.id]
        assert "Tok/s" in chart.render().plain and f"peak {max(history.series('tokens_per_s')):,.0f}" in \
            chart.render().plain
        await pilot.press("escape")
        await pilot.press("2")  # the model's row says it is deployed
        await wait_for(pilot, lambda: plain(table(app).cells(1)[2]) == "Ready · deployed", what="deployed in Custom")
        await pilot.press("3")
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, LogDialog), what="the server log")
        await pilot.press("escape")
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the stop question")
        await pilot.press("y")
        await wait_for(pilot, lambda: state() == "Stopped", 30, what="Stopped on screen")
        await pilot.press("r")  # started again: one row of that name, Ready, with the same key
        await wait_for(pilot, lambda: table(app).row_count == 1 and table(app).cursor_key not in (None, deployment.id),
                       30, what="the new row in the old one's place")
        again = table(app).cursor_key
        await wait_for(pilot, lambda: plain(table(app).cells(again)[3]) == "Ready", 120, what="Ready again")
        assert app.store.deployments[again].api_key == ready.api_key
        await pilot.press("2", "p")  # a new deployment under that name asks before it replaces the stopped one
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen.is_mounted
                                and app.screen)
        await wait_for(pilot, lambda: "already running" in str(drawer.query_one("#error").render()), 15,
                       what="the name taken by the live one")
        await pilot.press("escape", "3", "x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the stop question")
        await pilot.press("y")
        await wait_for(pilot, lambda: plain(table(app).cells(again)[3]) == "Stopped", 30, what="Stopped again")
        await pilot.press("2", "p")
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen.is_mounted
                                and app.screen)
        await wait_for(pilot, lambda: "replaces the stopped deployment 'tiny'" in str(drawer.query_one("#plan").render()),
                       15, what="the plan to say so")
        await pilot.press("ctrl+s")
        question = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen)
        assert "Replace the stopped deployment tiny?" in question.title_text
        await pilot.press("n")  # kept: the drawer says why nothing started
        await wait_for(pilot, lambda: "choose another name" in str(drawer.query_one("#error").render()), 10,
                       what="the drawer's reason")
        await pilot.press("escape", "3")
        await pilot.press("ctrl+d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), what="the delete question")
        await pilot.press("y")
        await wait_for(pilot, lambda: table(app).row_count == 0, 10, what="the row to go")
        await pilot.press("2")
        await wait_for(pilot, lambda: plain(table(app).cells(1)[2]) == "Ready", what="no longer deployed")
    assert deployments.deployment_rows(db) == [] and deployment.state == DeploymentState.PENDING


async def test_deploy_from_the_drawer_goes_ready_and_a_restarted_dashboard_reattaches(db, tiny_model_dir):
    import socket

    from catalog.schema import DeploymentState
    from engine import deployments
    from tui.screens.deploy_drawer import DeployDrawer
    from tui.screens.details import LiveDetails

    models.import_path(db, tiny_model_dir, "tiny")
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2", "p")
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen, what="the drawer")
        plan = lambda: str(drawer.query_one("#plan").render())  # noqa: E731
        error = lambda: str(drawer.query_one("#error").render())  # noqa: E731
        await wait_for(pilot, lambda: "fits" in plan() and "built-in server on the CPU" in plan(), what="the plan")
        drawer.query_one("#port").value = "abc"
        await wait_for(pilot, lambda: "Port: 'abc' is not a whole number" in error(), what="the bad port")
        assert drawer.query_one("#port").has_class("-invalid")
        with socket.socket() as taken:  # a port in use: refused at launch, the drawer stays with what was typed
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            drawer.query_one("#port").value = str(port)
            drawer.query_one("#served_name").value = "tiny-chat"
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: f"port {port} on 127.0.0.1 is in use" in error(), what="port in use")
        assert app.screen is drawer and drawer.query_one("#served_name").value == "tiny-chat"
        assert deployments.deployment_rows(db) == []
        drawer.query_one("#port").value = ""
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, DeploymentsScreen), what="Active deployments")
        [deployment] = deployments.deployment_rows(db)
        assert deployment.served_name == "tiny-chat" and table(app).cursor_key == deployment.id

        def state() -> str:
            return plain(table(app).cells(deployment.id)[3])

        await wait_for(pilot, lambda: state() == "Ready", 120, what="Ready on screen")
    # The dashboard has quit; the deployment lives on, and a new dashboard shows it Ready again.
    assert deployments.deployment_rows(db)[0].state == DeploymentState.READY
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: table(app).row_count == 1, what="the deployment listed")
        await pilot.pause(2.5)  # a reconcile has run meanwhile: it must not take the server for gone
        assert state() == "Ready"
        await pilot.press("d")
        details = await wait_for(pilot, lambda: isinstance(app.screen, LiveDetails) and app.screen, what="details")
        fields = dict(details.fields)
        assert "-m engine.server" in fields["Command"] and "--served-name tiny-chat" in fields["Command"]
        assert fields["API key"].startswith("sk-md-") and fields["API key"] != deployment.api_key  # masked
        await pilot.press("escape")
    deployments.stop(db, deployment.id)


async def test_the_row_action_follows_the_seed_download_deploy_connect(db):
    from tui.screens.deploy_drawer import DeployDrawer

    ids = seed(db)
    app = ModelDeckApp(db, follow=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        community = app.screen
        qwen = "Qwen/Qwen2.5-0.5B-Instruct"
        table(app).move_to_key(qwen)  # downloaded and deployed: Connect leads to its deployment
        await pilot.pause()
        assert "enter: Connect" in str(community.query_one("#preview").render())
        await pilot.press("enter")  # its Ready deployment's connection kit
        from tui.screens.connect_dialog import ConnectDialog

        connect = await wait_for(pilot, lambda: isinstance(app.screen, ConnectDialog) and app.screen, what="Connect")
        assert app.store.deployments[connect.deployment_id].name == "support-bot"
        await pilot.press("escape")
        await pilot.press("2")  # Custom: p on a Ready model opens the drawer for it
        table(app).move_to_key(ids["base"])
        await pilot.press("p")
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen, what="drawer")
        assert drawer.model_id == ids["base"]
        await pilot.press("escape")
        table(app).move_to_key(ids["pending"])  # not Ready: says so
        await pilot.press("p")
        await pilot.pause()
        assert not isinstance(app.screen, DeployDrawer)
        await pilot.press("1")
        table(app).move_to_key("Qwen/Qwen2.5-1.5B-Instruct")  # not downloaded: Deploy asks to download first
        await pilot.pause()
        assert "enter: Download" in str(community.query_one("#preview").render())
        await pilot.press("p")
        question = await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen)
        assert question.title_text == "Download Qwen2.5 1.5B Instruct first?"
        await pilot.press("n")
