"""DetailsDialog: everything known about one thing (a custom or community model, a deployment),
as aligned key/value lines that scroll; `escape` closes, `y` copies the first path or link."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

Fields = list[tuple[str, str | Text]]


class DetailsDialog(ModalScreen[None]):
    AUTO_FOCUS = ".dialog-scroll"  # arrows and page keys scroll what does not fit
    BINDINGS = [
        Binding("escape,q,d", "dismiss", "Close"),
        Binding("y", "copy", "Copy path/link"),
    ]

    def __init__(self, title: str, fields: Fields, copy_value: str | None = None):
        super().__init__(classes="dialog")
        self.title_text, self.fields, self.copy_value = title, fields, copy_value

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in self.fields:
            table.add_row(key, value)
        with Vertical(id="dialog", classes="wide"):
            yield Label(self.title_text, classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(table)
            hint = "escape close" + ("  ·  y copy " + ("link" if "://" in self.copy_value else "path") if self.copy_value else "")
            yield Label(hint, classes="dialog-hint")

    def action_copy(self) -> None:
        self.app.copy_text(self.copy_value, "path or link")
