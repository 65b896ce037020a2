"""LogDialog (`l`): a job's log, following it as it grows (like `tail -f`); `escape` closes."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Log
from textual.worker import get_current_worker

MAX_LINES = 5000  # the log widget keeps the tail; the file keeps everything


class LogDialog(ModalScreen[None]):
    AUTO_FOCUS = "Log"
    BINDINGS = [
        Binding("escape,q,l", "dismiss", "Close"),
        Binding("y", "copy_path", "Copy log path"),
    ]

    def __init__(self, title: str, log_path: str):
        super().__init__(classes="dialog")
        self.title_text, self.log_path = title, log_path

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide log"):
            yield Label(self.title_text, classes="dialog-title")
            yield Log(max_lines=MAX_LINES, id="log")
            yield Label("follows as it grows  ·  escape close  ·  y copy the log file's path", classes="dialog-hint")

    def on_mount(self) -> None:
        self.follow()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def follow(self) -> None:
        """Read what the job appends, in a thread, until the dialog closes."""
        from engine.logs import follow

        worker, log = get_current_worker(), self.query_one(Log)
        for lines in follow(self.log_path, stop=lambda: worker.is_cancelled):
            self.app.call_from_thread(log.write_lines, lines)

    def action_copy_path(self) -> None:
        self.app.copy_text(self.log_path, "log path")
