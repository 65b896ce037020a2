"""CompareScreen (`m` in Active deployments, or `modeldeck compare A B`): the same prompt to two to four models at
once — a deployment's base and its adapters, other deployments, external endpoints — their replies streamed side
by side, each with its time to first token, tokens/s and token count, kept like a conversation (each model
answers with its own earlier replies in its context). A model that fails says why in its column; the others go on.

Side by side where there is room (a column needs about 38 cells), else two a row, else one above the other.
`enter` sends; `ctrl+o` asks each prompt of a JSONL file in turn, each on its own; `escape` stops what is
streaming, else goes back; `ctrl+n` starts afresh; `ctrl+t` sets the system prompt and sampling (greedy by
default, so that replies differ by their models, not by chance). The HTTP client is engine.chat's, through
engine.compare.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Input, Label, Static

from engine.chat import ChatParams, ReplyStats
from engine.errors import EngineError
from tui.screens.base import PrimaryButton, ReportsWorkerErrors
from tui.screens.chat import ChatSettingsDialog, settings_line
from tui.widgets.info import InfoLine

COLUMN_WIDTH = 38  # the narrowest a column is worth reading in
RENDER_EVERY_S = 0.05  # how often a streaming reply is redrawn (per column)
EMPTY = "Type a prompt below and press enter: every model answers it at once, here side by side."


class TurnView(Vertical):
    """One prompt and one model's reply to it, with the reply's numbers."""

    DEFAULT_CSS = """
    TurnView { height: auto; margin-bottom: 1; }
    TurnView > .prompt { color: $text-accent; }
    TurnView > .stats { color: $text-muted; }
    TurnView > .failed { color: $error; }
    """

    def __init__(self, prompt: str):
        super().__init__()
        self.prompt = prompt

    def compose(self) -> ComposeResult:
        yield Static(Text(f"» {self.prompt}"), classes="prompt")
        yield Static("", classes="reply")
        yield Static("waiting for the first token…", classes="stats")

    def show(self, text: str, stats: ReplyStats, live: bool) -> None:
        self.query_one(".reply", Static).update(Text(text))
        self.call_after_refresh(self.parent.scroll_end, animate=False)  # the newest text in view, as it streams
        stats_line = self.query_one(".stats", Static)
        if stats.error:
            stats_line.set_class(True, "failed")
            stats_line.update(Text(f"failed: {stats.error}" + (f" · after {stats.tokens:,} tokens" if text else "")))
        elif live and stats.ttft_s is None:
            stats_line.update("waiting for the first token…")
        else:
            stats_line.update(("streaming · " if live else "") + stats.describe())


class ModelColumn(Vertical):
    DEFAULT_CSS = """
    ModelColumn { border: round $panel-lighten-2; padding: 0 1; height: 1fr; }
    ModelColumn > .model { text-style: bold; color: $text-success; height: 1; }
    ModelColumn > VerticalScroll { height: 1fr; }
    ModelColumn .hint { color: $text-muted; }
    """

    def __init__(self, label: str, problem: str | None):
        super().__init__()
        self.label, self.problem = label, problem

    def compose(self) -> ComposeResult:
        yield Label(Text(self.label), classes="model")
        with VerticalScroll():
            if self.problem:
                yield Static(Text(f"cannot be asked: {self.problem}"), classes="hint")



class CompareScreen(ReportsWorkerErrors, Screen):
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("escape", "stop_or_back", "Stop/back", tooltip="Stop the replies (keeping what came), else go back"),
        Binding("ctrl+o", "prompts_file", "Prompts file", tooltip="Ask each prompt of a JSONL file in turn"),
        Binding("ctrl+n", "new_comparison", "New", tooltip="Start afresh: every model forgets the conversation"),
        Binding("ctrl+t", "settings", "Settings", tooltip="System prompt, temperature, top-p, max tokens"),
    ]
    DEFAULT_CSS = """
    CompareScreen #title { height: 1; background: $panel; color: $text; padding: 0 1; text-style: bold; }
    CompareScreen #settings-line { padding: 0 1; }
    CompareScreen #columns { height: 1fr; grid-gutter: 0 1; padding: 0 1; }
    CompareScreen #compare-error { height: auto; color: $error; padding: 0 1; }
    CompareScreen #prompt { margin: 0 1 1 1; background: $boost; }
    """

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names
        self.models = []  # engine.compare.Contender, once read
        self.system_prompt, self.params = "", ChatParams(temperature=0.0)
        self.client = None
        self._task: asyncio.Future | None = None
        self._busy = False

    def compose(self) -> ComposeResult:
        yield InfoLine("Compare · " + " · ".join(self.names), id="title")
        yield InfoLine("", id="settings-line", classes="subtle-line")
        yield Grid(id="columns")
        yield Static("", id="compare-error")
        yield Input(placeholder="Prompt for every model (enter sends; ctrl+o a file of prompts; ctrl+t settings)",
                    id="prompt", compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        from engine.chat import new_client

        self.client = new_client()
        self._show_settings()
        self.prepare()

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def on_resize(self) -> None:
        self._lay_out()
        self._show_settings()

    def _lay_out(self) -> None:
        """As many columns side by side as fit (all of them where they do), the rest in rows below."""
        count = max(len(self.models), 1)
        across = max(1, min(count, (self.size.width - 2) // COLUMN_WIDTH))
        grid = self.query_one("#columns", Grid)
        grid.styles.grid_size_columns = across
        grid.styles.grid_size_rows = -(-count // across)

    def _show_settings(self) -> None:
        p = self.params
        sampling = "greedy" if p.temperature == 0 else f"temperature {p.temperature:g} · top-p {p.top_p:g}"
        line = settings_line(self.system_prompt, f"{sampling} · max {p.max_tokens:,} tokens", max(20, self.size.width - 2))
        self.query_one("#settings-line", InfoLine).update(line)

    def _error(self, message: str) -> None:
        self.query_one("#compare-error", Static).update(Text(message))

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def prepare(self) -> None:
        """Who is compared: each name as a deployment, DEPLOYMENT:MODEL or a served model; their keys."""
        from engine import compare

        try:
            models = compare.contenders(self.app.db, self.names)
        except EngineError as exc:
            self.app.call_from_thread(self._error, str(exc))
            return
        self.app.call_from_thread(self._show_models, models)

    def _show_models(self, models) -> None:
        self.models = models
        grid = self.query_one("#columns", Grid)
        grid.remove_children()
        grid.mount_all([ModelColumn(m.label, m.problem) for m in models])
        self._lay_out()
        if all(m.problem for m in models):
            self._error("No model can be asked now (see each column).")

    def _columns(self) -> list[ModelColumn]:
        return list(self.query(ModelColumn))

    # -- asking -------------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        if self._busy:
            self.notify("Replies are still coming: escape stops them", severity="warning", timeout=3)
            return
        if not self.models:
            self._error("Nothing to compare yet (see the message above).")
            return
        event.input.value = ""
        self._error("")
        self._busy = True
        self.ask([prompt])

    @work(exclusive=True, group="ask", exit_on_error=False)
    async def ask(self, prompts: list[str], alone: bool = False) -> None:
        """Each prompt in turn to every model at once (`alone`: a file's, each on its own, not joining the
        conversation); escape stops the round under way and those after it."""
        try:
            for number, prompt in enumerate(prompts, 1):
                if len(prompts) > 1:
                    self._error(f"prompt {number} of {len(prompts)}")
                self._task = asyncio.ensure_future(self._round(prompt, alone))
                try:
                    await asyncio.shield(self._task)
                except asyncio.CancelledError:
                    if not self._task.cancelled():  # the screen is going away, not a stop
                        self._task.cancel()
                        raise
                    self._error(f"stopped at prompt {number} of {len(prompts)}" if len(prompts) > 1 else "")
                    return
                finally:
                    self._task = None
            if len(prompts) > 1:
                self._error(f"{len(prompts)} prompts asked")
        finally:
            self._busy = False

    async def _round(self, prompt: str, alone: bool = False) -> None:
        from engine import compare

        views = []
        for column in self._columns():
            view = TurnView(prompt)
            views.append(view)
            await column.query_one(VerticalScroll).mount(view)
        last_drawn = [0.0] * len(views)
        stats = [ReplyStats() for _ in views]
        texts = [""] * len(views)

        def grew(index: int, text: str, reply_stats: ReplyStats) -> None:
            stats[index], texts[index] = reply_stats, text
            if time.monotonic() - last_drawn[index] >= RENDER_EVERY_S:  # a fast server must not redraw per token
                last_drawn[index] = time.monotonic()
                views[index].show(text, reply_stats, live=True)

        def ended(index: int, reply) -> None:  # each column's numbers as soon as its own reply is whole
            views[index].show(reply.text, reply.stats, live=False)

        try:
            replies = await compare.ask_all(self.client, self.models, prompt, self.params, self.system_prompt, grew,
                                            ended, alone)
        except asyncio.CancelledError:
            for view, text, reply_stats in zip(views, texts, stats):  # what came stays, marked as stopped
                reply_stats.finish = reply_stats.finish or "stopped"
                view.show(text, reply_stats, live=False)
            raise
        for view, reply in zip(views, replies):
            view.show(reply.text, reply.stats, live=False)

    # -- actions ------------------------------------------------------------------------------------

    def action_stop_or_back(self) -> None:
        if self._task is not None:
            self._task.cancel()
        elif not self._busy:
            self.app.pop_screen()

    def action_new_comparison(self) -> None:
        if self._busy:
            self.notify("Replies are still coming: escape stops them first", severity="warning", timeout=3)
            return
        for model in self.models:
            model.history.clear()
        self._show_models(self.models)
        self._error("")

    def action_settings(self) -> None:
        def chosen(result: tuple[str, ChatParams] | None) -> None:
            if result is not None:
                self.system_prompt, self.params = result
                self._show_settings()

        self.app.push_screen(ChatSettingsDialog(self.system_prompt, self.params), chosen)

    def action_prompts_file(self) -> None:
        if self._busy:
            self.notify("Replies are still coming: escape stops them first", severity="warning", timeout=3)
            return
        from tui.screens.file_picker import FilePicker

        start = Path(self.app.dataset_folder or ".").expanduser()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.app.dataset_folder = str(path.parent)
                self.read_prompts(path)

        self.app.push_screen(FilePicker(start if start.is_dir() else Path(".")), picked)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def read_prompts(self, path: Path) -> None:
        from engine import compare

        try:
            prompts = compare.read_prompts(path)
        except EngineError as exc:
            self.app.call_from_thread(self._error, str(exc))
            return
        self.app.call_from_thread(self._ask_file, prompts)

    def _ask_file(self, prompts: list[str]) -> None:
        if self._busy or not self.models:
            return
        self._busy = True
        self.ask(prompts, alone=True)


class ComparePicker(PrimaryButton, ModalScreen[list[str] | None]):
    """Which models to compare: every model a Ready deployment serves (its base, its adapters) and every external
    endpoint; two to four of them."""

    PRIMARY = "compare"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "compare", "Compare")]

    def __init__(self, choices: list[tuple[str, str]], chosen: list[str]):
        """`choices`: (name as compare takes it, how it is listed)."""
        super().__init__(classes="dialog")
        self.choices, self.chosen = choices, chosen

    def compose(self) -> ComposeResult:
        from textual.widgets import SelectionList

        with Vertical(id="dialog", classes="wide"):
            yield Label("Compare models", classes="dialog-title")
            yield Static("Choose 2 to 4 (space), then ctrl+s: the same prompts go to all of them at once.",
                         classes="dialog-body")
            yield SelectionList[str](*[(Text(shown), name, name in self.chosen) for name, shown in self.choices],
                                     id="models")
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Compare (ctrl+s)", variant="primary", id="compare", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def action_compare(self) -> None:
        from engine.compare import MAX_MODELS, MIN_MODELS
        from textual.widgets import SelectionList

        picked = [name for name, _ in self.choices if name in self.query_one("#models", SelectionList).selected]
        if not MIN_MODELS <= len(picked) <= MAX_MODELS:
            self.query_one("#error", Static).update(f"Choose {MIN_MODELS} to {MAX_MODELS} models; {len(picked)} chosen.")
            return
        self.dismiss(picked)
