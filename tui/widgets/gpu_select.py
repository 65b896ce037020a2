"""GpuSelect: the GPUs to run on (auto, each GPU with its free memory, all, CPU), read through NVML in a
thread after mounting, so a dialog opens at once. Posts Loaded when the machine's GPUs are known."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual import work
from textual.message import Message
from textual.widgets import Select

if TYPE_CHECKING:
    from engine.gpus import Gpu


class GpuSelect(Select[str]):
    class Loaded(Message):
        def __init__(self, select: GpuSelect, gpus: list[Gpu]):
            super().__init__()
            self.select, self.gpus = select, gpus

    def __init__(self, **kwargs):
        super().__init__([("auto: the freest GPU, else the CPU", "auto"), ("CPU", "cpu")], value="auto",
                         allow_blank=False, compact=True, **kwargs)
        self.gpus: list[Gpu] | None = None  # None until NVML has answered

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, group="gpus", exit_on_error=False)
    def load(self) -> None:
        from engine.gpus import list_gpus

        gpus = list_gpus()
        self.app.call_from_thread(self._loaded, gpus)

    def _loaded(self, gpus: list[Gpu]) -> None:
        from engine.gpus import choices

        self.gpus, chosen = gpus, self.value  # a choice made before NVML answered stays
        options = choices(gpus)
        self.set_options(options)
        if chosen in [value for _, value in options]:
            # Select repaints its label only when the value changes: step off and back onto the choice.
            self.value = next(value for _, value in options if value != chosen)
            self.value = chosen
        self.post_message(self.Loaded(self, gpus))
