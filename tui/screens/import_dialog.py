"""ImportDialog (`i` in Custom): a local model folder or GGUF file, and a name. Checked before it closes:
a bad path shows its reason here and keeps what was typed."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from engine.errors import EngineError
from engine.localmodel import NAME_PATTERN, check_gguf, check_model_folder
from tui.screens.base import PrimaryButton


class ImportDialog(PrimaryButton, ModalScreen[tuple[Path, str | None] | None]):
    PRIMARY = "import"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Import a local model", classes="dialog-title")
            yield Static("A Hugging Face folder is used where it is; a .gguf file is converted once.",
                         classes="dialog-body")
            yield Label("Path (enter imports, tab to the name)", classes="field-label")
            yield Input(placeholder="/path/to/model-folder or /path/to/model.gguf", id="path")
            yield Label("Name (optional)", classes="field-label")
            yield Input(placeholder="default: the folder or file name", id="name")
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Import", variant="primary", id="import")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_import()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "path":
            self.query_one("#error", Static).update("")  # an old error must not describe a new path

    def action_import(self) -> None:
        raw = self.query_one("#path", Input).value.strip()
        error = self.query_one("#error", Static)
        if not raw:
            error.update("Give the path of a model folder or a .gguf file.")
            self.query_one("#path", Input).focus()
            return
        path = Path(raw).expanduser()
        try:
            check_gguf(path) if path.suffix.lower() == ".gguf" else check_model_folder(path)
        except EngineError as exc:
            error.update(str(exc))
            self.query_one("#path", Input).focus()
            return
        name = self.query_one("#name", Input).value.strip() or None
        if name is not None and (problem := self.name_problem(name)):
            error.update(problem)
            self.query_one("#name", Input).focus()
            return
        self.dismiss((path, name))

    def name_problem(self, name: str) -> str | None:
        """Checked here too, so a bad name is fixed in the dialog instead of lost with it."""
        if not NAME_PATTERN.match(name):
            return f"invalid name {name!r}: use letters, digits, '.', '_' or '-'"
        if any(row.model.name == name for row in self.app.store.models.values()):
            return f"a custom model named {name!r} already exists"
        return None
