"""LogDialog (`l`): a job's log, following it as it grows (like `tail -f`); `escape` closes."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label

from tui.widgets.log_view import FollowingLog


class LogDialog(ModalScreen[None]):
    AUTO_FOCUS = "FollowingLog"
    BINDINGS = [
        Binding("escape,q,l", "dismiss", "Close"),
        Binding("y", "copy_path", "Copy log path"),
    ]

    def __init__(self, title: str, log_path: str):
        super().__init__(classes="dialog")
        self.title_text, self.log_path = title, log_path

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide log"):
            yield Label(Text(self.title_text), classes="dialog-title")
            yield FollowingLog(self.log_path, id="log")
            yield Label("follows as it grows  ·  escape close  ·  y copy the log file's path", classes="dialog-hint")

    def action_copy_path(self) -> None:
        self.app.copy_text(self.log_path, "log path")
