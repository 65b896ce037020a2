"""DetailsDialog: everything known about one thing (a custom or community model, a deployment),
as aligned key/value lines that scroll; `escape` closes, `y` copies the first path or link.

LiveDetails follows a running thing (a deployment): its fields and its log's tail, live. TrainingDetails
adds what a fine-tuned adapter has: its loss curve (train and validation)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from tui.widgets.load_chart import LoadChart
from tui.widgets.log_view import FollowingLog
from tui.widgets.loss_chart import LossChart

if TYPE_CHECKING:
    from engine.load import LoadHistory

Fields = list[tuple[str, str | Text]]
LIVE_REFRESH_S = 0.5


def fields_table(fields: Fields) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in fields:
        table.add_row(key, value)
    return table


class DetailsDialog(ModalScreen[None]):
    AUTO_FOCUS = ".dialog-scroll"  # arrows and page keys scroll what does not fit
    BINDINGS = [
        Binding("escape,q,d", "dismiss", "Close"),
        Binding("y", "copy", "Copy path/link"),
    ]
    CLASSES = "wide"

    def __init__(self, title: str, fields: Fields, copy_value: str | None = None):
        super().__init__(classes="dialog")
        self.title_text, self.fields, self.copy_value = title, fields, copy_value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes=self.CLASSES):
            yield Label(Text(self.title_text), classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(fields_table(self.fields), id="fields")
            yield from self.compose_extra()
            yield Label(self.hint(), id="hint", classes="dialog-hint")

    def compose_extra(self) -> ComposeResult:
        yield from ()

    def hint(self) -> str:
        return "escape close" + ("  ·  y copy " + ("link" if "://" in self.copy_value else "path") if self.copy_value else "")

    def action_copy(self) -> None:
        self.app.copy_text(self.copy_value, "path or link")


class LiveDetails(DetailsDialog):
    """Details that follow a running thing: `live()` returns the current fields and log path; it is asked
    again twice a second, and the log's tail follows the file."""

    CLASSES = "wide live"

    def __init__(self, title: str, live: Callable[[], tuple[Fields, str | None]], copy_value: str | None = None):
        fields, self.log_path = live()
        super().__init__(title, fields, copy_value)
        self.live = live

    def compose_extra(self) -> ComposeResult:
        yield FollowingLog(self.log_path, id="log")

    def on_mount(self) -> None:
        self.set_interval(LIVE_REFRESH_S, self.refresh_live)

    def refresh_live(self) -> None:
        self.show(*self.live())

    def show(self, fields: Fields, log_path: str | None) -> None:
        if fields != self.fields:
            self.fields = fields
            self.query_one("#fields", Static).update(fields_table(fields))
        if log_path:
            self.query_one(FollowingLog).show(log_path)

    def hint(self) -> str:
        return super().hint() + "  ·  live"


class DeploymentDetails(LiveDetails):
    """A deployment's details with its load over the last minutes (LoadChart), above its server's log."""

    CLASSES = "wide live deployment"

    def __init__(self, title: str, live: Callable[[], tuple[Fields, str | None]],
                 load: Callable[[], LoadHistory | None], copy_value: str | None = None):
        super().__init__(title, live, copy_value)
        self.load = load

    def compose_extra(self) -> ComposeResult:
        yield LoadChart(id="load")
        yield from super().compose_extra()

    def on_mount(self) -> None:  # LiveDetails.on_mount runs too
        self.query_one(LoadChart).show(self.load())

    def load_changed(self, deployment_ids: set[int]) -> None:
        self.query_one(LoadChart).show(self.load())

    def gpus_changed(self) -> None: ...


class TrainingDetails(LiveDetails):
    """An adapter's details with its loss curve and job log. `live()` returns the current fields, curves
    (and "evaluation": the held-out rows' perplexities, once it is Ready) and log path, so the dialog follows a
    running fine-tune."""

    CLASSES = "wide live training"

    def __init__(self, title: str, live: Callable[[], tuple[Fields, dict, str | None]], copy_value: str | None = None,
                 training: Callable[[], bool] = lambda: False):
        self.curves: dict = {}
        self.training = training  # whether its fine-tune runs now (the dialog follows it then)

        def fields_and_log() -> tuple[Fields, str | None]:
            fields, self.curves, log_path = live()
            return fields, log_path

        super().__init__(title, fields_and_log, copy_value)

    def compose_extra(self) -> ComposeResult:
        yield LossChart(id="chart")
        yield from super().compose_extra()

    def refresh_live(self) -> None:
        super().refresh_live()
        self._show_curves()
        self.query_one("#hint", Label).update(self.hint())  # the run ends while it is open

    def on_mount(self) -> None:  # LiveDetails.on_mount runs too (Textual calls each class's handler)
        self._show_curves()

    def _show_curves(self) -> None:
        self.query_one(LossChart).set_curves(self.curves.get("train", []), self.curves.get("eval", []),
                                             self.curves.get("evaluation"))

    def hint(self) -> str:
        return DetailsDialog.hint(self) + ("  ·  live while it trains" if self.training() else "")
