"""sparkline(): values over time as one line of block characters (▁ to █), each value a cell, scaled to the
highest shown (or a given top, as a GPU's 100%); zero is a dim ▁, so a quiet stretch still reads as time."""

from __future__ import annotations

from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int, top: float | None = None, style: str = "cyan") -> Text:
    """The last `width` values, right-aligned (fewer values than cells: blank on the left; None, a value not
    known, blank too)."""
    shown = values[-width:] if width > 0 else []
    top = top if top is not None else max((v for v in shown if v is not None), default=0.0)
    text = Text(" " * (max(width, 0) - len(shown)), no_wrap=True)
    for value in shown:
        if value is None:
            text.append(" ")
        elif value <= 0 or top <= 0:
            text.append(BLOCKS[0], style="dim")
        else:
            level = min(len(BLOCKS) - 1, max(0, round(value / top * (len(BLOCKS) - 1))))
            text.append(BLOCKS[level], style=style)
    return text
