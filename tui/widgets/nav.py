"""NavBar: the top line: the three tabs (keys 1 2 3) with the current one lit, and what is running."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

TABS = (("community", "1", "Community"), ("custom", "2", "Custom"), ("deployments", "3", "Active deployments"))


class NavBar(Widget):
    DEFAULT_CSS = """
    NavBar { height: 1; background: $panel; }
    """
    activity = reactive("")

    def __init__(self, current: str, **kwargs):
        super().__init__(**kwargs)
        self.current = current

    def render(self) -> Text:
        text = Text(" modeldeck ", style="bold reverse")
        for mode, key, label in TABS:
            text.append(" ")
            text.append(f" {key} {label} ", style="bold" if mode == self.current else "dim")
            if mode == self.current:
                text.stylize("reverse", len(text) - len(label) - 4, len(text))
        if self.activity:
            text.append("  " + self.activity, style="italic")
        return text

    def on_click(self, event) -> None:
        x = 12
        for mode, key, label in TABS:
            width = len(label) + 4
            if x <= event.x < x + width:
                self.app.switch_mode(mode)
                return
            x += width + 1
