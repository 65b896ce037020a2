"""FilePicker: choose a dataset file from a folder tree (JSON Lines and JSON files only); `enter` on a
file picks it, `backspace` goes up a folder, `escape` cancels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Label

SUFFIXES = (".jsonl", ".json")


class DatasetTree(DirectoryTree):
    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or p.suffix.lower() in SUFFIXES)]


class FilePicker(ModalScreen[Path | None]):
    AUTO_FOCUS = "DatasetTree"
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("backspace", "up", "Parent folder"),
    ]

    def __init__(self, start: Path):
        super().__init__(classes="dialog")
        start = start if start.is_dir() else Path.cwd()
        self.folder = start.resolve() if str(start) == "." else start  # "." says nothing; a path given stays as given

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide picker"):
            yield Label(Text(f"Choose a dataset in {self.folder}"), id="picker-title", classes="dialog-title")
            yield DatasetTree(self.folder)
            yield Label("enter pick a file or open a folder  ·  backspace parent folder  ·  escape cancel",
                        classes="dialog-hint")

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(event.path)

    def action_up(self) -> None:
        tree = self.query_one(DatasetTree)
        self.folder = Path(tree.path).resolve().parent
        tree.path = self.folder
        self.query_one("#picker-title", Label).update(f"Choose a dataset in {self.folder}")
