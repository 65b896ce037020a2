"""GpuStrip: this machine's GPUs under the nav bar of every tab screen: a line per GPU where there is room
(load sparkline, utilisation, memory, temperature, power, who holds it), else one compact line for all.
Hidden where there is no GPU. The app reads the GPUs in a worker (NVML) and hands the strip each reading."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.widget import Widget

from engine.format import gib, gpu_usage, held_by
from tui.widgets.sparkline import sparkline

if TYPE_CHECKING:
    from engine.gpus import GpuHistory, GpuState

WIDE = 110  # columns from which each GPU gets its own line
ROWS_A_LINE = 5  # a line per GPU while there are at most (screen rows / this) GPUs: the table keeps its rows
HINT = "  4: details"


def short_holder(state: GpuState) -> str:
    """Who holds a GPU in a word or two: modeldeck's work by name, another process by its user."""
    if not state.holders:
        return "free"
    first = state.holders[0]
    word = first.what.removeprefix("deployment ") if first.ours else (first.user or f"pid {first.pids[0]}")
    return word + (f" +{len(state.holders) - 1}" if len(state.holders) > 1 else "")


def _memory_style(state: GpuState) -> str:
    used = state.gpu.memory_used_mb / state.gpu.memory_total_mb if state.gpu.memory_total_mb else 0
    return "bold red" if used > 0.9 else ("yellow" if used > 0.6 else "green")


class GpuStrip(Widget):
    DEFAULT_CSS = """
    GpuStrip { height: auto; background: $panel; display: none; }
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.states: list[GpuState] = []
        self.history: GpuHistory | None = None

    def on_mount(self) -> None:
        self.show(self.app.store.gpus, self.app.store.gpu_history)

    def show(self, states: list[GpuState], history: GpuHistory | None) -> None:
        resized = len(states) != len(self.states)  # a new layout only when its height may change
        self.states, self.history = states, history
        self.display = bool(states)
        self.refresh(layout=resized)

    def on_resize(self) -> None:
        self.refresh(layout=True)  # wide and compact have different heights

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.states) if self._wide(width) else len(self._compact(width).split("\n"))

    def _wide(self, width: int) -> bool:
        return width >= WIDE and len(self.states) <= max(2, self.app.size.height // ROWS_A_LINE)

    def render(self) -> Text:
        if not self.states:
            return Text()
        return self._lines() if self._wide(self.size.width) else self._compact(self.size.width)

    def _lines(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        for n, state in enumerate(self.states):
            gpu = state.gpu
            util, memory, temperature, power = gpu_usage(gpu)
            load = list(self.history.utilization.get(gpu.index, ())) if self.history else []
            text.append(f" GPU {gpu.index} ", style="bold")
            text.append(f"{gpu.name.removeprefix('NVIDIA '):<18.18} ", style="dim")
            text.append_text(sparkline(load, 12, top=100))
            text.append(f" {util:>4} ")
            text.append(f"{memory:>15}", style=_memory_style(state))
            text.append(f" {temperature:>5} {power:>10}  ")
            text.append(held_by(state, commands=False), style="bold" if state.held_by_us else "")
            if n == 0:
                text.append(HINT, style="dim")
            if n < len(self.states) - 1:
                text.append("\n")
        return text

    def _compact(self, width: int) -> Text:
        """Every GPU in a few words, as many to a line as fit (an 8-GPU box: two lines at 80 columns)."""
        entries = []
        for state in self.states:
            gpu = state.gpu
            entry = Text.assemble((f"{gpu.index} ", "bold"),
                                  f"{gpu.utilization if gpu.utilization is not None else '—'}% ",
                                  (f"{gib(gpu.memory_used_mb)}/{gib(gpu.memory_total_mb)}G", _memory_style(state)),
                                  f" {short_holder(state)}")
            entries.append(entry)
        text, line = Text(no_wrap=True, overflow="ellipsis"), Text(" GPU ", style="bold")
        for entry in entries:
            if line.cell_len > 5 and line.cell_len + 3 + entry.cell_len > width:
                text.append_text(line)
                text.append("\n")
                line = Text("     ")
            elif line.cell_len > 5:
                line.append(" │ ", style="dim")
            line.append_text(entry)
        if line.cell_len + len(HINT) <= width:
            line.append(HINT, style="dim")
        return text.append_text(line)
