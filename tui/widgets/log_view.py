"""FollowingLog: a job's log file, tailed as it grows (like `tail -f`), in a thread, for as long as the
widget is on screen; long lines wrap (a path or a traceback's message is read whole, at 80 columns too).
Used by the log dialog (`l`) and the fine-tune details."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.widgets import RichLog
from textual.worker import get_current_worker

MAX_LINES = 5000  # the widget keeps the tail; the file keeps everything


class FollowingLog(RichLog):
    def __init__(self, path: str | None = None, **kwargs):
        super().__init__(max_lines=MAX_LINES, wrap=True, min_width=20, markup=False, highlight=False, **kwargs)
        self.path = path

    def on_mount(self) -> None:
        if self.path:
            self.follow(self.path)

    def show(self, path: str) -> None:
        """Follow another file (a job that was retried writes a new log)."""
        if path != self.path:
            self.path = path
            self.clear()
            self.follow(path)

    @work(thread=True, exclusive=True, exit_on_error=False, group="follow-log")
    def follow(self, path: str) -> None:
        from engine.logs import follow

        worker, app = get_current_worker(), self.app
        for lines in follow(path, stop=lambda: worker.is_cancelled):
            if not worker.is_cancelled:
                app.call_from_thread(self._append, lines)

    def _append(self, lines: list[str]) -> None:
        if self.is_attached:  # the dialog may have closed while the lines were read
            for line in lines[-MAX_LINES:]:
                self.write(Text(line))

