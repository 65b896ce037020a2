"""InfoLine: fixed-size text (status lines, the preview of the highlighted row). Unlike Static, an
update repaints only this widget, without a layout pass over the screen: these change on every
keystroke and every cursor move. Lines never wrap (a long path would push the next line out of the
fixed height); they end in an ellipsis instead."""

from __future__ import annotations

from rich.console import RenderableType
from textual.widget import Widget


class InfoLine(Widget):
    DEFAULT_CSS = "InfoLine { height: 1; text-wrap: nowrap; text-overflow: ellipsis; }"

    def __init__(self, content: RenderableType = "", **kwargs):
        super().__init__(**kwargs)
        self._content = content

    def update(self, content: RenderableType) -> None:
        self._content = content
        self.refresh()

    def render(self) -> RenderableType:
        return self._content
