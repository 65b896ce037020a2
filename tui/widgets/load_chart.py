"""LoadChart: a Ready deployment's load over the last minutes, in its details: tokens/s, requests/s and time
to first token (p50 and p95) as sparklines, each with its value now and its peak."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widget import Widget

from engine.format import human_duration
from tui.widgets.sparkline import sparkline

if TYPE_CHECKING:
    from engine.load import LoadHistory

LABEL_WIDTH = 7
VALUE_WIDTH = 26  # "now 1,234  peak 5,678" on the right


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:,.0f} ms"


class LoadChart(Widget):
    DEFAULT_CSS = "LoadChart { height: 4; }"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.history: LoadHistory | None = None
        self._shown: tuple = ()

    def show(self, history: LoadHistory | None) -> None:
        key = (len(history.points), history.points[-1].at) if history and history.points else ()
        if history is not self.history or key != self._shown:
            self.history, self._shown = history, key
            self.refresh()

    def render(self) -> Text:
        points = list(self.history.points) if self.history else []
        if not points:
            return Text("Load over the last minutes appears here once the server has answered a few readings of "
                        "its /metrics (every 2 s while the dashboard runs).", style="dim")
        width = max(self.size.width - LABEL_WIDTH - VALUE_WIDTH - 2, 4)
        tokens = [p.tokens_per_s for p in points]
        requests = [p.requests_per_s for p in points]
        p95 = [p.ttft_p95 or 0.0 for p in points]
        last = points[-1]
        rows = [("Tok/s", sparkline(tokens, width), f"now {last.tokens_per_s:,.0f}  peak {max(tokens):,.0f}"),
                ("Req/s", sparkline(requests, width, style="green"),
                 f"now {last.requests_per_s:,.1f}  peak {max(requests):,.1f}"),
                ("TTFT", sparkline(p95, width, style="magenta"),
                 f"p50 {_ms(last.ttft_p50)}  p95 {_ms(last.ttft_p95)}")]
        text = Text(no_wrap=True, overflow="ellipsis")
        for label, line, value in rows:
            text.append(f"{label:<{LABEL_WIDTH}}", style="bold")
            text.append_text(line)
            text.append(f"  {value}\n")
        shown = min(width, len(points))  # what the lines hold: from the reading before their first point
        began = points[-shown - 1].at if len(points) > shown else self.history.readings[0][0]
        text.append(" " * LABEL_WIDTH + f"the last {human_duration(last.at - began)}, a point a reading; "
                    "TTFT: p95 over 30 s", style="dim")
        return text
