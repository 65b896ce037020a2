"""FilterBar: the `/` search field above a table; filters as you type, `escape` clears it."""

from __future__ import annotations

from textual.binding import Binding
from textual.widgets import Input


class FilterBar(Input):
    DEFAULT_CSS = """
    FilterBar { height: 1; border: none; padding: 0 1; background: $boost; }
    FilterBar:focus { border: none; background: $boost; }
    """
    BINDINGS = [
        Binding("escape", "clear_and_leave", "Clear filter", show=False),
        Binding("down", "submit", "To the table", show=False),
    ]

    def __init__(self, placeholder: str = "/ filter", **kwargs):
        super().__init__(placeholder=placeholder, **kwargs)

    def action_clear_and_leave(self) -> None:
        self.value = ""
        self.screen.focus_next("LiveTable")

    def action_submit(self) -> None:
        self.screen.focus_next("LiveTable")
