"""HelpDialog (`?`): the keys of the current screen and of the app, from their bindings."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Label, Static

WIDE_ENOUGH_FOR_IDS = 110  # columns; narrower, the descriptions need the room


def _key_label(key: str) -> str:
    names = {"question_mark": "?", "slash": "/", "escape": "esc", "enter": "enter"}
    return ", ".join(names.get(k, k) for k in key.split(","))


class HelpDialog(ModalScreen[None]):
    AUTO_FOCUS = ".dialog-scroll"  # arrows and page keys scroll what does not fit
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, screen: Screen, app_bindings: list[Binding]):
        super().__init__(classes="dialog")
        self.for_screen, self.app_bindings = screen, app_bindings

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        ids = self.app.size.width >= WIDE_ENOUGH_FOR_IDS
        if ids:
            table.add_column(style="dim", no_wrap=True)  # the id, to give it another key in the config file
        keymap = getattr(self.app, "keymap", {})

        def add(binding: Binding) -> None:
            key = keymap.get(binding.id, binding.key) if binding.id else binding.key
            table.add_row(_key_label(key), binding.tooltip or binding.description, *([binding.id or ""] if ids else []))

        title = getattr(self.for_screen, "TAB_TITLE", "") or "This screen"
        table.add_row(title, "", style="bold underline")
        for binding in getattr(self.for_screen, "BINDINGS", []):
            if isinstance(binding, Binding) and binding.description:
                add(binding)
        for line in getattr(self.for_screen, "HELP_EXTRA", ()):
            table.add_row(*line)
        table.add_row("", "")
        table.add_row("Everywhere", "", style="bold underline")
        for binding in self.app_bindings:
            add(binding)
        table.add_row("ctrl+p", "Command palette: every action by name")
        with Vertical(id="dialog", classes="wide"):
            yield Label("Keys", classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(table)
            hint = "escape close" + ("  ·  dim: the ids that [keys] of the config file takes" if ids else "")
            yield Label(Text(hint), classes="dialog-hint")
