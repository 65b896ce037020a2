"""TagPicker (`t`): choose one or more tags; a model must carry all of them to be listed."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, SelectionList

from catalog.tags import tag_order


class TagPicker(ModalScreen[set[str] | None]):
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("enter", "apply", "Apply", priority=True),
        Binding("c", "clear", "Clear all"),
    ]

    def __init__(self, tag_counts: dict[str, int], selected: set[str]):
        super().__init__(classes="dialog")
        self.tag_counts, self.selected = tag_counts, selected

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="menu"):
            yield Label("Tags: a model must have all you tick", classes="dialog-title")
            yield SelectionList[str](
                *[(f"{tag} ({self.tag_counts[tag]})", tag, tag in self.selected)
                  for tag in sorted(self.tag_counts, key=tag_order)]
            )
            yield Label("space tick · enter apply · c clear · esc cancel", classes="dialog-hint")

    def action_apply(self) -> None:
        self.dismiss(set(self.query_one(SelectionList).selected))

    def action_clear(self) -> None:
        self.query_one(SelectionList).deselect_all()
