"""The chat pane and the Connect dialog driven with Pilot, against a real deployment (the built-in server,
a tiny model without an end token so replies run long enough to watch, stop and break)."""

from __future__ import annotations

import signal

import psutil
import pytest

from catalog.schema import DeploymentState
from engine import conversations, deployments, jobs, models
from engine.backends import DeploySettings
from tests.conftest import wait_until
from tests.tui_helpers import wait_for
from tui.app import ModelDeckApp
from tui.screens.chat import ChatScreen, ChatSettingsDialog, ReplyView
from tui.screens.connect_dialog import ConnectDialog


@pytest.fixture
def deployment(db, tmp_path):
    from tests.tinymodel import make_tiny_llama

    models.import_path(db, make_tiny_llama(tmp_path / "endless", context=4096, endless=True), "endless")
    dep, _ = deployments.deploy(db, "endless", DeploySettings())

    def ready():
        jobs.reconcile(db)
        row = deployments.deployment_rows(db, {dep.id})[0]
        return row if row.state != DeploymentState.PENDING else None

    done = wait_until(ready, 120, 0.2, "the deployment to leave Pending")
    assert done.state == DeploymentState.READY, done.reason
    yield done
    if deployments.deployment_rows(db, {dep.id})[0].state == DeploymentState.READY:
        deployments.stop(db, dep.id)


async def open_chat(pilot, app, dep_id: int, max_tokens: int) -> ChatScreen:
    await wait_for(pilot, lambda: app.store.loaded and dep_id in app.store.deployments, what="data")
    await pilot.press("3")
    await wait_for(pilot, lambda: app.screen.table.cursor_key == dep_id, what="the deployment row")
    await pilot.press("c")
    chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen, what="the chat")
    await wait_for(pilot, lambda: chat.target is not None, what="the endpoint")
    await pilot.press("ctrl+t")
    settings = await wait_for(pilot, lambda: isinstance(app.screen, ChatSettingsDialog) and app.screen)
    settings.query_one("#max_tokens").value = str(max_tokens)
    await pilot.press("ctrl+s")
    await wait_for(pilot, lambda: app.screen is chat, what="back in the chat")
    return chat


def shown(static) -> str:
    """The text a Static shows, whatever renderable it holds (a Rich table, a group of snippets)."""
    from rich.console import Console

    console = Console(width=200, color_system=None)
    with console.capture() as capture:
        console.print(static.content)
    return capture.get()


def reply_text(chat: ChatScreen) -> str:
    views = chat.query(ReplyView)
    return views.last().query_one("Markdown").source if views else ""


async def send(pilot, chat: ChatScreen, prompt: str) -> None:
    chat.query_one("#prompt").value = prompt
    await pilot.press("enter")


async def test_a_reply_streams_into_the_pane_and_stopping_keeps_what_came(db, deployment):
    app = ModelDeckApp(db)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await open_chat(pilot, app, deployment.id, max_tokens=3000)
        await send(pilot, chat, "Tell me a story")
        lengths = []
        while len(lengths) < 4:  # the text grows while it streams
            await pilot.pause(0.05)
            length = len(reply_text(chat))
            if length and (not lengths or length > lengths[-1]):
                lengths.append(length)
        assert chat.streaming
        await pilot.press("escape")
        await wait_for(pilot, lambda: not chat.streaming, what="the reply to stop")
        stats_line = str(chat.query(ReplyView).last().query_one(".stats").render())
        assert "stopped" in stats_line and "tokens" in stats_line and "first token" in stats_line
        assert isinstance(app.screen, ChatScreen)  # escape stopped the reply; it did not leave the chat
        kept = reply_text(chat)
        assert len(kept) >= lengths[-1]
    [conversation] = conversations.listed(db, deployment.id)
    turns = conversations.turns(db, conversation.id)
    assert [t.role for t in turns] == ["user", "assistant"] and turns[0].content == "Tell me a story"
    assert turns[1].content == kept and turns[1].stats.finish == "stopped" and 0 < turns[1].stats.tokens < 3000


async def test_a_stop_that_lands_inside_a_redraw_keeps_the_pane_as_saved(db, deployment, monkeypatch):
    """Escape pressed while a fragment is being written to the pane (the write queues it, then yields):
    the pane once showed that fragment twice, the conversation once (seen in CI)."""
    from textual.widgets._markdown import MarkdownStream

    app = ModelDeckApp(db)
    write, writes = MarkdownStream.write, []

    async def write_then_stop(stream, fragment: str) -> None:
        writes.append(fragment)
        if len(writes) == 3 and isinstance(app.screen, ChatScreen):
            app.screen.action_stop_or_back()  # the cancel reaches the write at its await
        await write(stream, fragment)

    monkeypatch.setattr(MarkdownStream, "write", write_then_stop)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await open_chat(pilot, app, deployment.id, max_tokens=3000)
        await send(pilot, chat, "Tell me a story")
        await wait_for(pilot, lambda: len(writes) >= 3 and not chat.streaming, 30, what="the stopped reply")
        kept = reply_text(chat)
    [conversation] = conversations.listed(db, deployment.id)
    saved = conversations.turns(db, conversation.id)[1]
    assert saved.stats.finish == "stopped" and saved.content == kept


async def test_the_conversation_survives_a_restart_and_regenerate_replaces_the_reply(db, deployment):
    app = ModelDeckApp(db)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await open_chat(pilot, app, deployment.id, max_tokens=12)
        await send(pilot, chat, "Hello")
        await wait_for(pilot, lambda: not chat.streaming and len(chat.turns) == 2, 30, what="the reply")
        first = chat.turns[-1].content
        assert "12 tokens" in str(chat.query(ReplyView).last().query_one(".stats").render())
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not chat.streaming and len(chat.turns) == 2 and chat.turns[-1].content != first,
                       30, what="a new reply")
        assert len(chat.query(ReplyView)) == 1
    # A new dashboard, opened the way `modeldeck chat endless` opens it: the conversation is there.
    app = ModelDeckApp(db, open_chat="endless")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen, what="the chat")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: not isinstance(app.screen, ChatScreen), what="the conversation list")
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.query(ReplyView)) == 1, what="the conversation shown")
        assert [t.role for t in chat.turns] == ["user", "assistant"] and chat.turns[0].content == "Hello"
        assert chat.turns[1].content == reply_text(chat) != first


async def test_a_server_killed_mid_reply_is_one_calm_line(db, deployment):
    app = ModelDeckApp(db)
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await open_chat(pilot, app, deployment.id, max_tokens=4000)
        await send(pilot, chat, "Go on")
        await wait_for(pilot, lambda: len(reply_text(chat)) > 20, what="some text")
        server = psutil.Process(jobs.get(db, deployment.job_id).pid).children()[0]
        server.send_signal(signal.SIGKILL)
        await wait_for(pilot, lambda: not chat.streaming, 15, what="the reply to end")
        error = str(chat.query_one("#chat-error").render())
        assert error == "the server closed the connection mid-reply — ctrl+r retries"
        assert len(reply_text(chat)) > 20  # what came is kept
        assert str(chat.query(ReplyView).last().query_one(".stats").render()).endswith("tokens · failed")
        kept = reply_text(chat)
        # The supervisor has seen its server die: retrying now says why it cannot, and keeps the reply.
        await wait_for(pilot, lambda: app.store.deployments[deployment.id].state == DeploymentState.FAILED, 15,
                       what="the deployment Failed")
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert str(chat.query_one("#chat-error").render()).startswith("endless is failed: deploy it again")
        assert reply_text(chat) == kept and isinstance(app.screen, ChatScreen)


async def test_connect_shows_the_kit_and_copies_with_the_real_key(db, deployment, monkeypatch):
    monkeypatch.setenv("SSH_CONNECTION", "10.1.2.3 50000 10.9.8.7 22")
    copied = []
    app = ModelDeckApp(db)
    monkeypatch.setattr(app, "copy_to_clipboard", copied.append)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded and deployment.id in app.store.deployments, what="data")
        await pilot.press("2")  # Connect on the deployed model in Custom
        await pilot.press("c")
        dialog = await wait_for(pilot, lambda: isinstance(app.screen, ConnectDialog) and app.screen, what="Connect")
        await wait_for(pilot, lambda: dialog.key is not None, what="the key")
        facts = shown(dialog.query_one("#facts"))
        assert deployment.endpoint in facts and deployment.api_key not in facts
        assert f"ssh -N -L {deployment.endpoint.split(':')[2].split('/')[0]}:127.0.0.1:" in facts
        await pilot.press("1")
        assert copied[-1].startswith(f"curl -sS {deployment.endpoint}/chat/completions") and deployment.api_key in copied[-1]
        await pilot.press("k")
        assert copied[-1] == deployment.api_key
        await pilot.press("r")
        assert deployment.api_key in shown(dialog.query_one("#facts"))
        assert deployment.api_key in shown(dialog.query_one("#snippets"))
        await pilot.press("c")  # and on to the chat
        await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen), what="the chat")


async def test_new_conversation_twice_on_an_empty_pane_keeps_one_hint(db):
    from tests.tui_helpers import seed

    seed(db)
    app = ModelDeckApp(db, follow=False, open_chat="support-bot")
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen, what="the chat")
        for _ in range(3):
            await pilot.press("ctrl+n")
            await pilot.pause()
        assert app.screen is chat and len(chat.query(".empty-hint")) == 1
        await pilot.press("escape")  # nothing streaming: back to Active deployments
        await wait_for(pilot, lambda: not isinstance(app.screen, ChatScreen), what="back")


async def test_brackets_in_what_is_typed_or_copied_are_text_not_markup(db):
    """A title like 'use a[/i] list' (or a reply holding '[') once ended the app when listed or copied."""
    from engine import conversations
    from engine.chat import ChatParams, ReplyStats
    from engine.conversations import Turn
    from tests.tui_helpers import seed
    from tui.screens.action_menu import ActionMenu

    seed(db)
    [dep] = [d for d in deployments.deployment_rows(db) if d.name == "support-bot"]
    conversation = conversations.create(db, dep.id, "", ChatParams())
    conversations.add(db, conversation.id, Turn("user", "use a[/i] list [bold]x[/bold]"))
    conversations.add(db, conversation.id, Turn("assistant", "[/red] closing tags [b]", ReplyStats(finish="stop")))
    app = ModelDeckApp(db, follow=False, open_chat="support-bot")
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=(100, 30)) as pilot:
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen, what="the chat")
        await pilot.press("ctrl+o")
        menu = await wait_for(pilot, lambda: isinstance(app.screen, ActionMenu) and app.screen, what="the list")
        assert "use a[/i] list [bold]x[/bold]" in str(menu.query_one("OptionList").get_option_at_index(0).prompt)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(chat.turns) == 2, what="the conversation")
        await pilot.press("ctrl+y")
        await pilot.pause()
        assert copied == ["[/red] closing tags [b]"] and app.is_running
