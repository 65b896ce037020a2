"""TagPicker (`t`): choose one or more tags; a model must carry all of them to be listed."""

from __future__ import annotations

from rich.segment import Segment
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.strip import Strip
from textual.widgets import Checkbox, Label, SelectionList
from textual.widgets.option_list import OptionDoesNotExist

from catalog.tags import tag_order


class TickList(SelectionList[str]):
    """A SelectionList whose ticked rows differ in shape, not colour alone (colour-blind users, monochrome
    terminals): a tick in the box, an empty box otherwise."""

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        segments = list(strip)
        try:
            option = self.get_option_at_index(self.scroll_offset.y + y)
        except OptionDoesNotExist:
            return strip
        if len(segments) < 2 or segments[1].text != Checkbox.BUTTON_INNER:  # the box SelectionList draws
            return strip
        segments[1] = Segment("✓" if option.value in self._selected else " ", segments[1].style)
        return Strip(segments, strip.cell_length)


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
            yield TickList(
                *[(f"{tag} ({self.tag_counts[tag]})", tag, tag in self.selected)
                  for tag in sorted(self.tag_counts, key=tag_order)]
            )
            yield Label("space tick · enter apply · c clear · esc cancel", classes="dialog-hint")

    def action_apply(self) -> None:
        self.dismiss(set(self.query_one(TickList).selected))

    def action_clear(self) -> None:
        self.query_one(TickList).deselect_all()
