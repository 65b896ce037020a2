"""ChatScreen (`c` on a Ready deployment): a conversation with a deployed model, streamed as it is
generated and rendered as Markdown, with time to first token, tokens/s and the token count under each
reply.

`enter` sends; `escape` stops a reply mid-stream (what came is kept), else goes back; `ctrl+r`
regenerates the last reply (and retries a failed one); `ctrl+n` starts a new conversation; `ctrl+o` lists
this deployment's conversations to reopen one; `ctrl+t` sets the system prompt, temperature, top-p and max
tokens; `ctrl+y` copies the last reply. Conversations are kept in the database. Failures (the server gone
mid-reply, a 401, a 400, a timeout) are one line under the conversation, which stays as it was.

The HTTP client is engine.chat; database writes happen off the UI thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, Markdown, Static

from engine.chat import ChatParams, ReplyStats
from engine.errors import EngineError
from engine.format import human_time
from tui.screens.action_menu import ActionMenu
from tui.screens.base import PrimaryButton, ReportsWorkerErrors
from tui.widgets.info import InfoLine

if TYPE_CHECKING:
    from engine.chat import Target
    from engine.conversations import Turn


RENDER_EVERY_S = 0.05  # how often a streaming reply is redrawn
EMPTY = ("Type a message below and press enter: the reply streams here, with its time to first token, tokens/s "
         "and token count. escape stops a reply; ctrl+t sets the system prompt and sampling.")


class ReplyView(Vertical):
    """One assistant reply: its Markdown (streamed into) and its numbers."""

    DEFAULT_CSS = """
    ReplyView { height: auto; margin-bottom: 1; }
    ReplyView > .who { color: $text-success; text-style: bold; }
    ReplyView Markdown { margin: 0; padding: 0; }
    ReplyView > .stats { color: $text-muted; }
    """

    def __init__(self, who: str, content: str = "", stats: ReplyStats | None = None):
        super().__init__()
        self.who, self.initial, self.stats = who, content, stats

    def compose(self) -> ComposeResult:
        yield Label(self.who, classes="who")
        yield Markdown(self.initial)
        yield Static(self.stats_text(self.stats), classes="stats")

    @staticmethod
    def stats_text(stats: ReplyStats | None, live: bool = False) -> Text:
        if stats is None or (live and stats.ttft_s is None):
            return Text("waiting for the first token…")
        text = Text(("streaming · " if live else "") + stats.describe())
        if stats.error:  # the reason itself is the line under the conversation (or in a reopened one, here)
            text.append(" · failed", style="red")
        return text

    def show_live(self, stats: ReplyStats) -> None:
        self.query_one(".stats", Static).update(self.stats_text(stats, live=True))

    def show_stats(self, stats: ReplyStats | None) -> None:
        self.stats = stats
        self.query_one(".stats", Static).update(self.stats_text(stats))


class PromptView(Vertical):
    DEFAULT_CSS = """
    PromptView { height: auto; margin-bottom: 1; }
    PromptView > .who { color: $text-accent; text-style: bold; }
    """

    def __init__(self, content: str):
        super().__init__()
        self.content = content

    def compose(self) -> ComposeResult:
        yield Label("You", classes="who")
        yield Static(Text(self.content))  # as typed: no markup


def settings_line(system_prompt: str, sampling: str, room: int) -> str:
    """`system: … · sampling` in `room` cells: the sampling settings whole; the system prompt takes the room left,
    cut at a word."""
    rest = f" · {sampling}"
    system = " ".join(system_prompt.split()) or "none"
    left = room - len("system: ") - len(rest)
    if len(system) > left:
        cut = system[: max(left - 1, 0)]
        system = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" .,;:") + "…"
    return f"system: {system}{rest}"


class ChatScreen(ReportsWorkerErrors, Screen):
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "stop_or_back", "Stop/back", tooltip="Stop the reply (keeping what came), else go back"),
        Binding("ctrl+r", "regenerate", "Regenerate", tooltip="Ask for the last reply again (retries a failed one)"),
        Binding("ctrl+n", "new_conversation", "New", tooltip="Start a new conversation"),
        Binding("ctrl+o", "open_conversation", "History", tooltip="Reopen a conversation with this deployment"),
        Binding("ctrl+t", "settings", "Settings", tooltip="System prompt, temperature, top-p, max tokens"),
        Binding("ctrl+y", "copy_reply", "Copy", tooltip="Copy the last reply (OSC 52, works over SSH)"),
    ]
    DEFAULT_CSS = """
    ChatScreen #title { height: 1; background: $panel; color: $text; padding: 0 1; text-style: bold; }
    ChatScreen #settings-line { padding: 0 1; }
    ChatScreen #messages { height: 1fr; padding: 0 1; }
    ChatScreen #chat-error { height: auto; color: $error; padding: 0 1; }
    ChatScreen #prompt { margin: 0 1 1 1; background: $boost; }
    ChatScreen .empty-hint { color: $text-muted; }
    """

    def __init__(self, deployment_id: int, conversation_id: int | None = None):
        super().__init__()
        self.deployment_id, self.conversation_id = deployment_id, conversation_id
        self.turns: list[Turn] = []
        self.system_prompt, self.params = "", ChatParams()
        self.target: Target | None = None
        self.client = None  # engine.chat.new_client(), made on mount
        self._busy = False
        self._streaming_task: asyncio.Future | None = None
        self._unrendered = 0  # parts of the streaming reply received since its last redraw

    # -- layout -------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield InfoLine("Chat", id="title")
        yield InfoLine("", id="settings-line", classes="subtle-line")
        with VerticalScroll(id="messages"):
            yield Static(EMPTY, classes="empty-hint")
        yield Static("", id="chat-error")
        yield Input(placeholder="Message (enter sends; ctrl+t settings, ctrl+o earlier conversations)", id="prompt",
                    compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        from engine.chat import new_client

        self.client = new_client()
        self.query_one("#messages", VerticalScroll).anchor()  # follow the newest text as it streams
        self._show_title()
        self._show_settings()
        self.prepare(self.conversation_id)

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def on_resize(self) -> None:
        self._show_title()
        self._show_settings()

    def _room(self) -> int:
        return max(20, self.size.width - 2)  # the lines' padding

    def _show_title(self) -> None:
        """Chat · name (served name) · endpoint: what does not fit goes whole, the least telling first."""
        dep = self.app.store.deployments.get(self.deployment_id)
        if dep is None:
            return
        served = f" ({dep.served_name})" if dep.served_name and dep.served_name != dep.name else ""
        endpoint = dep.endpoint or ""
        short = endpoint.removeprefix("http://").removesuffix("/v1")
        for title in (f"Chat · {dep.name}{served} · {endpoint}", f"Chat · {dep.name}{served} · {short}",
                      f"Chat · {dep.name} · {short}", f"Chat · {dep.name}"):
            if len(title) <= self._room():
                break
        self.query_one("#title", InfoLine).update(title)

    def _show_settings(self) -> None:
        p = self.params
        sampling = f"temperature {p.temperature:g} · top-p {p.top_p:g} · max {p.max_tokens:,} tokens"
        self.query_one("#settings-line", InfoLine).update(settings_line(self.system_prompt, sampling, self._room()))

    def _error(self, message: str) -> None:
        self.query_one("#chat-error", Static).update(Text(message))

    # -- loading ------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def prepare(self, conversation_id: int | None) -> None:
        """The endpoint's key (an external one's comes from the environment or the keyring), and the
        conversation to show: the one asked for, else none yet (made with the first message)."""
        from engine import conversations, endpoints
        from engine.chat import Target

        dep = self.app.store.deployments.get(self.deployment_id)
        if dep is None:
            self.app.call_from_thread(self._error, "This deployment was deleted.")
            return
        try:
            self.target = Target(dep.endpoint, endpoints.api_key(dep), dep.served_name)
        except EngineError as exc:
            self.app.call_from_thread(self._error, str(exc))
        if conversation_id is None:
            return
        with self.app.db.read() as session:
            from catalog.schema import Conversation

            conversation = session.get(Conversation, conversation_id)
        if conversation is None:
            return
        system_prompt, params = conversations.settings(conversation)
        turns = conversations.turns(self.app.db, conversation_id)
        self.app.call_from_thread(self._show_conversation, conversation_id, system_prompt, params, turns)

    def _show_conversation(self, conversation_id: int | None, system_prompt: str, params: ChatParams,
                           turns: list[Turn]) -> None:
        self.conversation_id, self.system_prompt, self.params, self.turns = conversation_id, system_prompt, params, turns
        self._show_settings()
        self._error("")
        messages = self.query_one("#messages", VerticalScroll)
        messages.remove_children()
        messages.mount_all([self._view(turn) for turn in turns] or [Static(EMPTY, classes="empty-hint")])
        messages.scroll_end(animate=False)

    def _view(self, turn: Turn):
        if turn.role == "user":
            return PromptView(turn.content)
        return ReplyView(self._who(), turn.content, turn.stats)

    def _who(self) -> str:
        dep = self.app.store.deployments.get(self.deployment_id)
        return dep.served_name if dep and dep.served_name else "assistant"

    # -- sending and streaming ----------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        """A reply is on its way or being saved: no other may start, the conversation may not change."""
        return self._busy

    def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self._busy:
            self.notify("A reply is still coming: escape stops it", severity="warning", timeout=3)
            return
        if self.target is None:
            self._error("No endpoint to send to (see the message above).")
            return
        event.input.value = ""
        self._error("")
        self._busy = True  # from now until the reply is saved
        self.send(prompt)

    @work(exclusive=True, group="reply", exit_on_error=False)
    async def send(self, prompt: str) -> None:
        from engine import conversations
        from engine.conversations import Turn

        db = self.app.db
        try:
            try:
                if self.conversation_id is None:
                    created = await asyncio.to_thread(conversations.create, db, self.deployment_id,
                                                      self.system_prompt, self.params)
                    self.conversation_id = created.id
                turn = await asyncio.to_thread(conversations.add, db, self.conversation_id, Turn("user", prompt))
            except EngineError as exc:  # not kept: the prompt goes back where it was typed
                self.query_one("#prompt", Input).value = prompt
                self._error(f"could not keep the message: {exc}")
                return
            self.turns.append(turn)
            await self.query(".empty-hint").remove()
            await self.query_one("#messages", VerticalScroll).mount(PromptView(prompt))
            await self._reply()
        finally:
            self._busy = False

    async def _reply(self) -> None:
        """Stream a reply to the conversation so far into a new ReplyView, then keep it, whatever happened:
        escape cancels only the streaming (self._streaming_task); saving always completes."""
        from engine import conversations
        from engine.conversations import Turn

        conversation_id = self.conversation_id  # the conversation cannot change while _busy
        view = ReplyView(self._who())
        messages = self.query_one("#messages", VerticalScroll)
        await messages.mount(view)
        messages.anchor()
        stream = Markdown.get_stream(view.query_one(Markdown))
        parts: list[str] = []
        stats = ReplyStats()
        history = conversations.request_messages(self.system_prompt, self.turns)
        self._streaming_task = asyncio.ensure_future(self._stream(history, stream, view, parts, stats))
        try:
            await asyncio.shield(self._streaming_task)
        except asyncio.CancelledError:
            if not self._streaming_task.cancelled():  # the screen is going away, not a stop
                self._streaming_task.cancel()
                raise
            stats.finish = "stopped"
        finally:
            self._streaming_task = None
        await stream.write("".join(parts[-self._unrendered:]) if self._unrendered else "")
        await stream.stop()
        view.show_stats(stats)
        # Kept whatever happened (a stopped or failed reply too), off the UI thread; awaited, so a regenerate
        # that follows finds its id.
        reply = await asyncio.to_thread(conversations.add, self.app.db, conversation_id,
                                        Turn("assistant", "".join(parts), stats))
        self.turns.append(reply)

    async def _stream(self, history: list[dict], stream, view: ReplyView, parts: list[str], stats: ReplyStats) -> None:
        """The reply's text into the Markdown stream, redrawn at most every RENDER_EVERY_S: a fast server
        (thousands of tokens/s) must not make the pane re-render per token; the eye cannot tell, and input
        stays quick. `self._unrendered` counts the parts received since the last redraw."""
        from engine.chat import ChatError, Delta, stream_chat

        last_write, self._unrendered = 0.0, 0
        try:
            async for event in stream_chat(self.client, self.target, history, self.params, stats):
                if isinstance(event, Delta):
                    parts.append(event.text)
                    self._unrendered += 1
                    if time.monotonic() - last_write >= RENDER_EVERY_S:
                        fragment = "".join(parts[-self._unrendered:])
                        self._unrendered, last_write = 0, time.monotonic()
                        # The stream queues the fragment before its first await: a stop (a cancel) during
                        # the write must not find it still counted as unrendered, and write it twice.
                        await stream.write(fragment)
                        view.show_live(stats)
        except ChatError as exc:
            stats.finish, stats.error = "error", str(exc)
            self._error(f"{exc} — ctrl+r retries")

    # -- actions ------------------------------------------------------------------------------------

    def action_stop_or_back(self) -> None:
        if self._streaming_task is not None:
            self._streaming_task.cancel()  # the reply so far is kept and saved
        elif not self._busy:
            self.app.pop_screen()

    def action_regenerate(self) -> None:
        if self._busy or self.target is None:
            return
        dep = self.app.store.deployments.get(self.deployment_id)
        if dep is None or dep.state.value != "ready":
            state = dep.state.value if dep else "deleted"
            self._error(f"{dep.name if dep else 'The deployment'} is {state}: deploy it again, then reopen this "
                        "conversation (ctrl+o) to go on; the reply so far is kept")
            return
        if not self.turns:
            self.notify("Nothing to regenerate yet", severity="warning", timeout=3)
            return
        self._error("")
        self._busy = True
        self.regenerate()

    @work(exclusive=True, group="reply", exit_on_error=False)
    async def regenerate(self) -> None:
        from engine import conversations

        try:
            if self.turns and self.turns[-1].role == "assistant":
                last = self.turns.pop()
                views = self.query(ReplyView)
                if views:
                    await views.last().remove()
                if last.id is not None:
                    await asyncio.to_thread(conversations.remove, self.app.db, last.id)
            await self._reply()
        finally:
            self._busy = False

    def action_new_conversation(self) -> None:
        if self._busy:
            self.notify("A reply is still coming: escape stops it first", severity="warning", timeout=3)
            return
        self._show_conversation(None, self.system_prompt, self.params, [])
        self.query_one("#prompt", Input).focus()

    def action_copy_reply(self) -> None:
        last = next((t for t in reversed(self.turns) if t.role == "assistant" and t.content), None)
        self.app.copy_text(last.content if last else None, "reply",
                           shown=f"the last reply ({len(last.content):,} characters)" if last else None)

    def action_open_conversation(self) -> None:
        if not self._busy:
            self.list_conversations()

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def list_conversations(self) -> None:
        from engine import conversations

        dep = self.app.store.deployments.get(self.deployment_id)
        # Also those with earlier deployments of the same name (stopped, failed, deployed again).
        same_name = {d.id for d in self.app.store.deployments.values() if dep and d.name == dep.name}
        found = conversations.listed(self.app.db, same_name | {self.deployment_id})
        if not found:
            self.app.call_from_thread(self.notify, "No conversations with this deployment yet", timeout=3)
            return
        options = [(str(c.id), f"{human_time(c.updated_at)}  {c.title or '(empty)'}") for c in found]

        def chosen(conversation_id: str | None) -> None:
            if conversation_id:
                self.prepare(int(conversation_id))

        self.app.call_from_thread(self.app.push_screen, ActionMenu("Conversations, latest first", options, wide=True),
                                  chosen)

    def action_settings(self) -> None:
        def chosen(result: tuple[str, ChatParams] | None) -> None:
            if result is not None:
                self.system_prompt, self.params = result
                self._show_settings()
                if self.conversation_id is not None:
                    self.save_settings(self.conversation_id, *result)

        self.app.push_screen(ChatSettingsDialog(self.system_prompt, self.params), chosen)

    @work(thread=True, group="save", exit_on_error=False)
    def save_settings(self, conversation_id: int, system_prompt: str, params: ChatParams) -> None:
        from engine import conversations

        conversations.update_settings(self.app.db, conversation_id, system_prompt, params)


class ChatSettingsDialog(PrimaryButton, ModalScreen[tuple[str, ChatParams] | None]):
    PRIMARY = "save"
    """The system prompt and sampling of a conversation; empty fields take the defaults."""

    AUTO_FOCUS = "#system"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]
    FIELDS = [("temperature", "Temperature", "0 to 2; 0 always picks the likeliest token"),
              ("top_p", "Top-p", "0 to 1; sample from the likeliest tokens that make up this share"),
              ("max_tokens", "Max tokens", "the longest reply, in tokens")]

    def __init__(self, system_prompt: str, params: ChatParams):
        super().__init__(classes="dialog")
        self.system_prompt, self.params = system_prompt, params

    def compose(self) -> ComposeResult:
        defaults = ChatParams()
        with Vertical(id="dialog", classes="finetune"):
            yield Label("Chat settings", classes="dialog-title")
            with Horizontal(classes="form-row"):
                yield Label("System prompt", classes="form-label")
                yield Input(self.system_prompt, placeholder="none", id="system", compact=True)
            for name, label, help_text in self.FIELDS:
                with Horizontal(classes="form-row"):
                    yield Label(label, classes="form-label")
                    value = getattr(self.params, name)
                    yield Input("" if value == getattr(defaults, name) else f"{value:g}",
                                placeholder=f"{getattr(defaults, name):g}", id=name, compact=True, tooltip=help_text)
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._check()

    def _check(self) -> tuple[ChatParams, dict[str, str]]:
        params, errors = ChatParams.from_strings({name: self.query_one(f"#{name}", Input).value
                                                  for name, _, _ in self.FIELDS})
        for name, _, _ in self.FIELDS:
            self.query_one(f"#{name}", Input).set_class(name in errors, "-invalid")
        self.query_one("#error", Static).update(Text("; ".join(errors.values())))
        return params, errors

    def action_save(self) -> None:
        params, errors = self._check()
        if not errors:
            self.dismiss((self.query_one("#system", Input).value.strip(), params))
