"""LossChart: training and validation loss against the step, drawn in braille dots (2×4 a cell), so a
curve of hundreds of points reads well in a dozen terminal rows and over SSH."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

# The braille dot bit of each (row, column) inside a character cell.
DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
AXIS_WIDTH = 8  # the loss labels on the left
Curve = list[list[float]]  # [[step, loss], ...]


class LossChart(Widget):
    DEFAULT_CSS = "LossChart { height: 9; }"
    SERIES = (("train", "cyan"), ("validation", "magenta"))

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.curves: tuple[Curve, Curve] = ([], [])
        self.evaluation: dict | None = None

    def set_curves(self, train: Curve, validation: Curve, evaluation: dict | None = None) -> None:
        """`evaluation`: the finished run's held-out rows, adapter against base (engine/jobs/evaluation.py)."""
        if (train, validation) != self.curves or evaluation != self.evaluation:
            self.curves, self.evaluation = (train, validation), evaluation
            self.refresh()

    def render(self) -> Text:
        points = [p for curve in self.curves for p in curve]
        if not points:
            return Text("The loss curve appears with the first training steps.", style="dim")
        width, height = max(self.size.width - AXIS_WIDTH, 4), max(self.size.height - 2, 2)
        steps, losses = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(steps), max(max(steps), min(steps) + 1)
        y0, y1 = min(losses), max(losses)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        dots_w, dots_h = width * 2, height * 4
        cells = [[0] * width for _ in range(height)]
        owner = [[-1] * width for _ in range(height)]  # which series drew last in a cell (its colour)

        def dot(x: float, y: float, series: int) -> None:
            col = min(int((x - x0) / (x1 - x0) * (dots_w - 1) + 0.5), dots_w - 1)
            row = min(int((y1 - y) / (y1 - y0) * (dots_h - 1) + 0.5), dots_h - 1)
            cells[row // 4][col // 2] |= DOTS[row % 4][col % 2]
            owner[row // 4][col // 2] = series

        for series, curve in enumerate(self.curves):
            for (sa, la), (sb, lb) in zip(curve, curve[1:]):  # join points with straight segments
                n = max(2, int(abs(sb - sa) / (x1 - x0) * dots_w) + 1)
                for i in range(n + 1):
                    dot(sa + (sb - sa) * i / n, la + (lb - la) * i / n, series)
            for step, loss in curve:
                dot(step, loss, series)

        text = Text(no_wrap=True, overflow="crop")
        for r in range(height):
            label = f"{y1:.3g}" if r == 0 else (f"{y0:.3g}" if r == height - 1 else "")
            text.append(f"{label:>{AXIS_WIDTH - 1}}│", style="dim")
            for c in range(width):
                style = self.SERIES[owner[r][c]][1] if owner[r][c] >= 0 else ""
                text.append(chr(0x2800 + cells[r][c]) if cells[r][c] else " ", style=style)
            text.append("\n")
        left, right = f"step {x0:g}", f"{x1:g}"
        text.append(" " * AXIS_WIDTH + left + right.rjust(width - len(left)) + "\n", style="dim")
        legend_start = len(text)
        text.append(" " * AXIS_WIDTH)
        for name, colour in self.SERIES:
            last = self.curves[self.SERIES.index((name, colour))]
            value = f" {last[-1][1]:.4f}" if last else " —"
            text.append("── ", style=colour)
            text.append(f"{name}{value}   ")
        adapter, base = ((self.evaluation or {}).get(k, {}).get("perplexity") for k in ("adapter", "base"))
        if adapter is not None and base is not None:  # did it help: on the same held-out rows
            word = "perplexity"
            if len(text) - legend_start + len(f"{word} {adapter:.3g} (base {base:.3g})") > self.size.width:
                word = "ppl"  # 80 columns
            text.append(f"{word} {adapter:.3g}", style="bold")
            text.append(f" (base {base:.3g})")
        return text
