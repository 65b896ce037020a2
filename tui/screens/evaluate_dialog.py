"""EvaluateDialog (`e` in Custom): score a Ready model (an adapter: beside its base) on a dataset. The dataset is
read and checked before anything starts: a bad row is said here by its line number, with what was typed kept.
Returns the evaluation job's id once it has started."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from engine.errors import EngineError
from tui.screens.base import PrimaryButton, ReportsWorkerErrors


class EvaluateDialog(PrimaryButton, ReportsWorkerErrors, ModalScreen[int | None]):
    PRIMARY = "start"
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+o", "browse", "Browse datasets"),
    ]

    def __init__(self, model_id: int, name: str, adapter_of: str | None):
        super().__init__(classes="dialog")
        self.model_id, self.model_name, self.adapter_of = model_id, name, adapter_of
        self._starting = False

    def compose(self) -> ComposeResult:
        scored = (f"{self.model_name} and its base {self.adapter_of}, on the same rows" if self.adapter_of
                  else self.model_name)
        with Vertical(id="dialog"):
            yield Label(f"Evaluate {self.model_name}", classes="dialog-title")
            yield Static(Text(f"The loss and perplexity of {scored}: on the tokens a fine-tune would learn (a chat's "
                              "replies, all of a text). The result joins its details."), classes="dialog-body")
            yield Label("Dataset (enter starts; ctrl+o browses)", classes="field-label")
            yield Input(placeholder="path to a .jsonl file: OpenAI chat, ShareGPT, Alpaca or text", id="dataset")
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Evaluate", variant="primary", id="start")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_start()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#error", Static).update("")  # an old error must not describe a new path

    def action_browse(self) -> None:
        from tui.screens.file_picker import FilePicker

        typed = self.query_one("#dataset", Input).value.strip()
        current = Path(typed or self.app.dataset_folder or ".").expanduser()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.app.dataset_folder = str(path.parent)
                self.query_one("#dataset", Input).value = str(path)

        self.app.push_screen(FilePicker(current if current.is_dir() else current.parent), picked)

    def action_start(self) -> None:
        if self._starting:
            return
        dataset = self.query_one("#dataset", Input).value.strip()
        if not dataset:
            self.query_one("#error", Static).update("Name a dataset file (ctrl+o browses).")
            return
        self._starting = True
        self.query_one("#error", Static).update("Reading the dataset…")
        self._start(dataset)

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def _start(self, dataset: str) -> None:
        from engine import evaluate

        try:
            job = evaluate.start(self.app.db, evaluate.plan(self.app.db, self.model_id, dataset))
        except EngineError as exc:
            self.app.call_from_thread(self._refused, str(exc))
            return
        self.app.call_from_thread(self.dismiss, job.id)

    def _refused(self, reason: str) -> None:
        self._starting = False
        self.query_one("#error", Static).update(Text(reason))
        self.query_one("#dataset", Input).focus()
