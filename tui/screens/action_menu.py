"""ActionMenu: the list of what can be done to the selected row (`enter`); returns the action id."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option


class ActionMenu(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, title: str, actions: list[tuple[str, str]], wide: bool = False):
        """`actions`: (action id, label with its key), in menu order. `wide`: for long labels."""
        super().__init__(classes="dialog")
        self.title_text, self.actions, self.wide = title, actions, wide

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide" if self.wide else "menu"):
            yield Label(Text(self.title_text), classes="dialog-title")
            # Text, not a string: a model's name or a chat's title may hold '[', which is not markup here.
            yield OptionList(*[Option(Text(label), id=action) for action, label in self.actions])

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
