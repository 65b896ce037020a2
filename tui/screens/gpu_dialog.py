"""GpuDialog (`4`): each GPU of this machine in detail, live: name and NVLink peers, utilisation and memory
with their recent history, temperature and power, and who holds it (modeldeck's deployments and fine-tunes,
other processes by pid, user and command). `modeldeck gpus` prints the same."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from engine.format import gib, gpu_usage
from tui.widgets.sparkline import sparkline

NO_GPU = ("No NVIDIA GPU here: NVML finds no driver, so work on this machine runs on the CPU. On a GPU machine "
          "this lists each GPU's load, memory, temperature and power, and who holds it.")
SPARK_WIDTH = 30  # a minute of readings


class GpuDialog(ModalScreen[None]):
    AUTO_FOCUS = ".dialog-scroll"
    BINDINGS = [Binding("escape,q,4", "dismiss", "Close")]

    def __init__(self) -> None:
        super().__init__(classes="dialog")

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="wide"):
            yield Label("GPUs on this machine", classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(self._body(), id="gpus")
            yield Label("escape close" + ("  ·  live, read every 2 s" if self.app.store.gpus else ""),
                        classes="dialog-hint")

    def load_changed(self, deployment_ids: set[int]) -> None: ...

    def gpus_changed(self) -> None:
        self.query_one("#gpus", Static).update(self._body())

    def _body(self):
        store = self.app.store
        if not store.gpus:
            return Text(NO_GPU if store.gpu_history is not None else "Reading the GPUs…")
        history = store.gpu_history
        blocks = []
        for state in store.gpus:
            gpu = state.gpu
            util, memory, temperature, power = gpu_usage(gpu)
            head = Text.assemble((f"GPU {gpu.index}  ", "bold"), gpu.name)
            if gpu.nvlink:
                head.append(f"  ·  NVLink to {', '.join(f'GPU {i}' for i in sorted(gpu.nvlink))}", style="dim")
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(no_wrap=True)
            grid.add_column(no_wrap=True)
            share = f" ({100 * gpu.memory_used_mb / gpu.memory_total_mb:.0f}%)" if gpu.memory_total_mb else ""
            grid.add_row("Utilisation", util, sparkline(list(history.utilization.get(gpu.index, ())), SPARK_WIDTH, 100))
            grid.add_row("Memory", f"{memory}{share}",
                         sparkline(list(history.memory.get(gpu.index, ())), SPARK_WIDTH, 100, "yellow"))
            grid.add_row("Free", f"{gib(gpu.memory_free_mb)} GiB", "")
            grid.add_row("Temperature", f"{temperature}, power {power}", "")
            holders = Table(box=None, padding=(0, 1), show_edge=False, pad_edge=False, expand=False)
            for name in ("Held by", "Memory", "Pids", "Command"):
                holders.add_column(name, style="bold" if name == "Held by" else "", no_wrap=name != "Command",
                                   overflow="fold")
            for holder in state.holders:
                who = holder.what if holder.ours else (f"{holder.user}" if holder.user else "not visible")
                holders.add_row(Text(who, style="bold green" if holder.ours else ""),
                                f"{gib(holder.memory_mb)} GiB" if holder.memory_mb is not None else
                                ("given it; not on it yet" if holder.ours and not holder.pids else "—"),
                                ", ".join(map(str, holder.pids)) or "—", holder.command or "")
            blocks += [head, grid, holders if state.holders else Text("Held by nobody: free", style="dim"), Text()]
        return Group(*blocks)
