"""ActionMenu: the list of what can be done to the selected row (`enter`); returns the action id."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option


class ActionMenu(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, title: str, actions: list[tuple[str, str]]):
        """`actions`: (action id, label with its key), in menu order."""
        super().__init__(classes="dialog")
        self.title_text, self.actions = title, actions

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="menu"):
            yield Label(self.title_text, classes="dialog-title")
            yield OptionList(*[Option(label, id=action) for action, label in self.actions])

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
