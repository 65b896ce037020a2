"""Snapshots of every screen and dialog at 80x24 and 120x40 (pytest-textual-snapshot).

Update after an intended change with: pytest tests/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

import pytest

from tests.tui_helpers import T0, busy_history, seed, seed_training, two_gpus, wait_for
from tui.app import ModelDeckApp
from tui.screens.action_menu import ActionMenu
from tui.screens.chat import ChatScreen
from tui.screens.confirm import ConfirmDialog
from tui.screens.connect_dialog import ConnectDialog
from tui.screens.deploy_drawer import DeployDrawer
from tui.screens.details import DetailsDialog, LiveDetails, TrainingDetails
from tui.screens.file_picker import FilePicker
from tui.screens.finetune_dialog import FinetuneDialog
from tui.screens.gpu_dialog import GpuDialog
from tui.screens.help import HelpDialog
from tui.screens.import_dialog import ImportDialog
from tui.screens.log_dialog import LogDialog
from tui.screens.tag_picker import TagPicker

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """Screens that show "how long ago" read this clock: the seeded rows are an hour old, always."""
    from tui.screens import deployments

    monkeypatch.setattr(deployments, "clock", lambda: T0 + 3600)


def app_for(db, seeded: bool = True, training: bool = False, gpus: bool = False, load: bool = False) -> ModelDeckApp:
    """The app on a seeded database; `gpus`: on a two-GPU box (as NVML would read it); `load`: the Ready
    deployment with a minute and a half of load history."""
    if seeded:
        ids = seed(db)
        if training:
            seed_training(db, ids)
    app = ModelDeckApp(db, follow=False)
    if gpus:
        app.gpu_reader = lambda _db: two_gpus()
    if load:
        [ready] = [d for d in deployment_rows(db) if d.state.value == "ready"]
        app.store.load[ready.id] = busy_history()
    return app


def kubeconfig_with(tmp_path, monkeypatch, *contexts: str) -> None:
    """A kubeconfig with these contexts (of a cluster nobody calls): the Kubernetes targets appear."""
    config = tmp_path / "kubeconfig"
    listed = ", ".join(f"{{name: {name}, context: {{cluster: c, user: u}}}}" for name in contexts)
    config.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://10.0.0.1'}}]\n"
                      f"users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{listed}]\ncurrent-context: {contexts[-1]}\n")
    monkeypatch.setenv("KUBECONFIG", str(config))


async def on_target(pilot, target: str, **fields: str):
    """The dialog on top, once its targets are read, set to a target (a Kubernetes context, a SLURM
    partition) and its fields (a namespace, a time limit...)."""
    dialog = pilot.app.screen
    await wait_for(pilot, lambda: dialog.query_one("TargetSelect").display, what="the targets")
    dialog.query_one("#target").value = target
    await pilot.pause()
    for field, value in fields.items():
        dialog.query_one(f"#{field}").value = value
    return dialog


def shown(screen_type):
    """A step for `keys`: wait until a dialog is on top, so the next keys reach it even on a busy machine."""
    async def wait(pilot) -> None:
        await wait_for(pilot, lambda: isinstance(pilot.app.screen, screen_type), what=screen_type.__name__)
        await pilot.pause()

    return wait


def keys(*presses):
    """Press keys in order; a callable among them is awaited as a step (see `shown`)."""
    async def run_before(pilot) -> None:
        await wait_for(pilot, lambda: pilot.app.store.loaded, what="data")
        await pilot.pause()
        for press in presses:
            if callable(press):
                await press(pilot)
                continue
            await pilot.press(press)
            await pilot.pause()
        # let layout settle: scrollbars appear or go in the refresh after the rows change
        for _ in range(3):
            await pilot.pause(0.05)

    return run_before


REPLY = """To reset your password:

1. Open **Settings → Account**.
2. Choose *Reset password* and follow the link we email you.

From a terminal: `acme auth reset --email you@example.com`."""


def deployment_rows(db):
    from engine.deployments import deployment_rows as rows

    return rows(db)


def serve_the_adapter(db) -> None:
    """The seeded Ready deployment serves the seeded adapter beside its base."""
    from sqlmodel import select

    from catalog.schema import DeploymentAdapter, Model

    [support_bot] = [d for d in deployment_rows(db) if d.name == "support-bot"]
    with db.write() as session:
        adapter = session.exec(select(Model).where(Model.name == "support-bot-lora")).one()
        session.add(DeploymentAdapter(deployment_id=support_bot.id, model_id=adapter.id,
                                      served_name="support-bot-lora", created_at=T0))


def free_ram(monkeypatch, available: int) -> None:
    """The deploy drawer's fit check against a fixed amount of free memory, not this machine's."""
    from collections import namedtuple

    import psutil

    memory = namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available))


async def gpus_read(pilot) -> None:
    """A step: wait until the GPUs were read twice (the sparklines have two points, always)."""
    await wait_for(pilot, lambda: pilot.app.store.gpu_history and len(pilot.app.store.gpu_history.utilization[0]) >= 2,
                   10, what="two readings of the GPUs")
    pilot.app.workers.cancel_group(pilot.app, "gpus")  # no third: the picture holds still
    await pilot.pause()


def plan_shown(expected: str = "Memory"):
    """A step: wait until the drawer's plan shows `expected` (the plan for what is typed now; it is asked
    for after a short pause, and the previous one stays on screen meanwhile)."""
    async def wait(pilot) -> None:
        from textual.widgets import Input

        await pilot.pause(0.4)
        await wait_for(pilot, lambda: expected in str(pilot.app.screen.query_one("#plan").render()), what="the plan")
        for field in pilot.app.screen.query(Input):  # the wait outlasts a blink: the cursor must hold still
            field.cursor_blink = False
        await pilot.pause()

    return wait


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

    def test_custom_with_a_fine_tune_running(self, snap_compare, db, size):
        assert snap_compare(app_for(db, training=True), terminal_size=size,
                            run_before=keys("2", "down", "down", "down", "down"))

    def test_deployments(self, snap_compare, db, size):
        assert snap_compare(app_for(db, load=True), terminal_size=size, run_before=keys("3"))

    def test_gpu_strip_on_a_two_gpu_machine(self, snap_compare, db, size):
        assert snap_compare(app_for(db, gpus=True), terminal_size=size, run_before=keys(gpus_read))

    def test_gpu_dialog(self, snap_compare, db, size):
        assert snap_compare(app_for(db, gpus=True), terminal_size=size,
                            run_before=keys(gpus_read, "4", shown(GpuDialog)))

    def test_deployments_empty(self, snap_compare, db, size):
        assert snap_compare(app_for(db, seeded=False), terminal_size=size, run_before=keys("3"))


@pytest.mark.parametrize("size", SIZES)
class TestDialogs:
    def test_help(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("question_mark", shown(HelpDialog)))

    def test_tag_picker(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("t", shown(TagPicker), "down", "space"))

    def test_community_details(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("down", "down", "down", "d", shown(DetailsDialog)))

    def test_custom_action_menu(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "end", "enter", shown(ActionMenu)))

    def test_custom_details(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "down", "d", shown(DetailsDialog)))

    def test_confirm_delete(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size,
                            run_before=keys("2", "down", "down", "ctrl+d", shown(ConfirmDialog)))

    def test_import_with_error(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size,
                            run_before=keys("2", "i", shown(ImportDialog), *"/nowhere", "enter"))

    def test_job_log(self, snap_compare, db, size):
        async def log_read(pilot):
            from tui.widgets.log_view import FollowingLog

            await wait_for(pilot, lambda: len(pilot.app.screen.query_one(FollowingLog).lines) >= 4, what="the log")

        assert snap_compare(app_for(db), terminal_size=size,
                            run_before=keys("2", "end", "l", shown(LogDialog), log_read))

    def test_deployment_details(self, snap_compare, db, size):
        async def log_read(pilot):
            from tui.widgets.log_view import FollowingLog

            await wait_for(pilot, lambda: len(pilot.app.screen.query_one(FollowingLog).lines) >= 5, what="the log")

        assert snap_compare(app_for(db, load=True), terminal_size=size,
                            run_before=keys("3", "d", shown(LiveDetails), log_read))

    def test_connect(self, snap_compare, db, size, monkeypatch):
        monkeypatch.setenv("SSH_CONNECTION", "10.1.2.3 50000 10.9.8.7 22")  # a session over SSH: the tunnel shows
        monkeypatch.setenv("USER", "ada")
        monkeypatch.setenv("LOGNAME", "ada")

        async def key_read(pilot):
            await wait_for(pilot, lambda: pilot.app.screen.key is not None, what="the key")
            await pilot.pause()

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("3", "enter", shown(ConnectDialog), key_read))

    def test_chat_with_a_finished_reply(self, snap_compare, db, size):
        from engine import conversations
        from engine.chat import ChatParams, ReplyStats
        from engine.conversations import Turn

        app = app_for(db)
        [support_bot] = [d for d in deployment_rows(db) if d.name == "support-bot"]
        conversation = conversations.create(db, support_bot.id, "You answer support questions briefly.",
                                            ChatParams(temperature=0.2, max_tokens=256))
        conversations.add(db, conversation.id, Turn("user", "How do I reset my password?"))
        conversations.add(db, conversation.id, Turn("assistant", REPLY, ReplyStats(
            ttft_s=0.042, usage_tokens=61, chunks=58, elapsed_s=1.32, finish="stop")))

        async def open_it(pilot):
            pilot.app.open_chat(support_bot.id, conversation.id)
            chat = await wait_for(pilot, lambda: isinstance(pilot.app.screen, ChatScreen) and pilot.app.screen)
            await wait_for(pilot, lambda: len(chat.turns) == 2, what="the conversation")
            chat.query_one("#prompt").cursor_blink = False  # the cursor must hold still for the picture
            await pilot.pause(0.2)

        assert snap_compare(app, terminal_size=size, run_before=keys(open_it))

    def test_deploy_drawer(self, snap_compare, db, size, monkeypatch):
        free_ram(monkeypatch, 16 * 2**30)
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "p", shown(DeployDrawer), plan_shown()))

    def test_deploy_drawer_on_a_kubernetes_target(self, snap_compare, db, size, monkeypatch, tmp_path):
        kubeconfig_with(tmp_path, monkeypatch, "prod-gpu", "staging")

        async def choose_cluster(pilot):
            drawer = await on_target(pilot, "prod-gpu", namespace="ml")
            drawer.query_one("#tensor_parallel").value = "2"
            await pilot.pause(0.4)
            await wait_for(pilot, lambda: "Kubernetes" in str(drawer.query_one("#plan").render()), what="the plan")

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "p", shown(DeployDrawer), choose_cluster))

    def test_finetune_dialog_on_a_kubernetes_target(self, snap_compare, db, size, monkeypatch, tmp_path):
        kubeconfig_with(tmp_path, monkeypatch, "prod-gpu")
        monkeypatch.setenv("MODELDECK_FINETUNE_IMAGE", "registry.local/modeldeck-finetune:0.1")

        async def choose_cluster(pilot):
            dialog = await on_target(pilot, "prod-gpu", namespace="ml")
            dialog.query_one("#gpu_count").value = "2"
            dialog.query_one("#dataset").value = "tests/data/support-chat.jsonl"
            await wait_for(pilot, lambda: "rows" in str(dialog.query_one("#dataset-summary").render()), what="the dataset")
            await wait_for(pilot, lambda: "Counting" not in str(dialog.query_one("#token-summary").render()), 30,
                           what="the token count to end")
            dialog.query_one("#dataset").focus()
            dialog.query_one("#dataset").cursor_blink = False

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "f", shown(FinetuneDialog), choose_cluster))

    def test_deploy_drawer_on_a_slurm_target(self, snap_compare, db, size, slurm):
        """The tests' real single-node cluster: its partitions listed, the request checked by the controller."""
        async def choose_partition(pilot):
            drawer = await on_target(pilot, "slurm:gpu", gpu_count="1", time="2:00:00", account="ml-team")
            await wait_for(pilot, lambda: "batch job" in str(drawer.query_one("#plan").render()), 30, what="the plan")

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "p", shown(DeployDrawer),
                                                                             choose_partition))

    def test_finetune_dialog_on_a_slurm_target(self, snap_compare, db, size, slurm):
        async def choose_partition(pilot):
            dialog = await on_target(pilot, "slurm:gpu", gpu_count="1", time="4:00:00", mem="32G",
                                     dataset="tests/data/support-chat.jsonl")
            await wait_for(pilot, lambda: "rows" in str(dialog.query_one("#dataset-summary").render()), what="the dataset")
            await wait_for(pilot, lambda: "Counting" not in str(dialog.query_one("#token-summary").render()), 30,
                           what="the token count to end")
            dialog.query_one("#dataset").focus()
            dialog.query_one("#dataset").cursor_blink = False

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys("2", "f", shown(FinetuneDialog),
                                                                             choose_partition))

    def test_deploy_drawer_exposed_and_too_big(self, snap_compare, db, size, monkeypatch):
        free_ram(monkeypatch, 512 * 2**20)
        # to the bind address: backend, GPUs, dtype, name, max length, port, host (no vLLM here: none of its fields)
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys(
            "2", "p", shown(DeployDrawer), plan_shown(), *["tab"] * 6, *"0.0.0.0", plan_shown("0.0.0.0 is reachable")))

    def test_finetune_dialog_with_a_bad_dataset_and_a_bad_rank(self, snap_compare, db, size):
        async def dataset_read(pilot):
            await wait_for(pilot, lambda: "line 3" in str(pilot.app.screen.query_one("#dataset-summary").render()),
                           what="the dataset's error")

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys(
            "2", "f", shown(FinetuneDialog), *"tests/data/support-chat-broken.jsonl", dataset_read,
            *["tab"] * 5, "0"))

    def test_dataset_file_picker(self, snap_compare, db, size):
        assert snap_compare(app_for(db), terminal_size=size, run_before=keys(
            "2", "f", shown(FinetuneDialog), *"tests/data/", "ctrl+o", shown(FilePicker)))

    def test_evaluate_dialog_with_a_bad_dataset(self, snap_compare, db, size):
        from tui.screens.evaluate_dialog import EvaluateDialog

        async def refused(pilot):
            await wait_for(pilot, lambda: "line 3" in str(pilot.app.screen.query_one("#error").render()),
                           what="the dataset's error")
            pilot.app.screen.query_one("#dataset").cursor_blink = False

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys(
            "2", "e", shown(EvaluateDialog), *"tests/data/support-chat-broken.jsonl", "enter", refused))

    def test_a_deployment_serving_an_adapter_and_its_unload_menu(self, snap_compare, db, size):
        app = app_for(db)
        serve_the_adapter(db)
        assert snap_compare(app, terminal_size=size, run_before=keys("3", "u", shown(ActionMenu)))

    def test_compare_pane_with_a_reply_and_a_model_that_cannot_answer(self, snap_compare, db, size):
        from engine.chat import ReplyStats
        from tui.screens.compare import CompareScreen, TurnView

        async def compared(pilot):
            pilot.app.open_compare(["support-bot", "qwen-small"])
            screen = await wait_for(pilot, lambda: isinstance(pilot.app.screen, CompareScreen) and pilot.app.screen)
            await wait_for(pilot, lambda: len(screen.models) == 2, what="the models")
            await pilot.pause()
            columns = screen._columns()
            for column, (text, stats) in zip(columns, [
                    (REPLY, ReplyStats(ttft_s=0.042, usage_tokens=61, chunks=58, elapsed_s=1.32, finish="stop")),
                    ("", ReplyStats(error="deployment 'qwen-small' is pending", finish="error"))]):
                view = TurnView("How do I reset my password?")
                await column.query_one("VerticalScroll").mount(view)
                view.show(text, stats, live=False)
            screen.query_one("#prompt").cursor_blink = False
            await pilot.pause(0.2)

        assert snap_compare(app_for(db), terminal_size=size, run_before=keys(compared))

    def test_compare_picker(self, snap_compare, db, size):
        from tui.screens.compare import ComparePicker

        app = app_for(db)
        serve_the_adapter(db)
        assert snap_compare(app, terminal_size=size, run_before=keys("3", "m", shown(ComparePicker)))

    def test_training_details_with_loss_curve_and_log(self, snap_compare, db, size):
        async def log_read(pilot):
            from tui.widgets.log_view import FollowingLog

            await wait_for(pilot, lambda: len(pilot.app.screen.query_one(FollowingLog).lines) >= 5, what="the log")

        assert snap_compare(app_for(db, training=True), terminal_size=size,
                            run_before=keys("2", "down", "d", shown(TrainingDetails), log_read))
