"""DeckScreen: what the three tab screens share: the nav bar, the footer, and the data hooks."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import ActiveBinding
from textual.screen import Screen
from textual.widgets import Button, Footer, Input
from textual.worker import Worker

from engine.errors import EngineError
from tui.store import Store
from tui.widgets.filter_bar import FilterBar
from tui.widgets.gpu_strip import GpuStrip
from tui.widgets.info import InfoLine
from tui.widgets.live_table import LiveTable
from tui.widgets.nav import NavBar

if TYPE_CHECKING:
    from catalog.db import Database


class ReportsWorkerErrors:
    """Worker.StateChanged does not bubble: screens and dialogs hand their workers' failures to the app,
    which shows them in one place."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.app.report_worker_error(event)


class PrimaryButton:
    """A form dialog's buttons: the primary one (its id is PRIMARY) runs action_PRIMARY, as the dialog's
    key does; any other (Cancel) closes the dialog with nothing."""

    PRIMARY = ""

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == self.PRIMARY:
            getattr(self, f"action_{self.PRIMARY}")()
        else:
            self.dismiss(None)


class FieldHelp:
    """A form dialog's help line (#field-help) says what the focused field is for: its tooltip."""

    def on_descendant_focus(self, event) -> None:
        tooltip = getattr(event.widget, "tooltip", None)
        self.query_one("#field-help").update(Text(tooltip if isinstance(tooltip, str) else ""))


FOOTER_PALETTE_WIDTH = 12  # "▏^p palette", at the footer's right end


class DeckScreen(ReportsWorkerErrors, Screen):
    TAB_TITLE = ""
    MODE = ""
    AUTO_FOCUS = "LiveTable"  # keys act on the table; `/` moves to the filter bar

    @property
    def store(self) -> Store:
        return self.app.store

    def compose_nav(self) -> ComposeResult:
        yield NavBar(self.MODE)
        yield GpuStrip()

    def compose_footer(self) -> ComposeResult:
        yield Footer(compact=True)

    def row_actions(self) -> list[str] | None:
        """The actions of this screen that the selected row can take now, the most wanted first, for the
        footer (80 columns do not hold every key: the last go first; `?` lists them all); None: the footer
        shows the screen's keys as bound."""
        return None

    @property
    def active_bindings(self) -> dict[str, ActiveBinding]:
        # The footer reads this (key dispatch does not): of this screen's own keys, only the row's actions,
        # shown even where their binding hides them from a footer that lists every key.
        bindings = super().active_bindings
        wanted = self.row_actions()
        if wanted is None:
            return bindings
        shown = {}
        for key, active in bindings.items():
            own = next((b for b in self._bindings.key_to_bindings.get(key, ()) if b.action in wanted), None)
            if own is not None and (active.node is self or not active.binding.show):  # enter: the table's, ours
                shown[key] = ActiveBinding(self, dataclasses.replace(own, show=True), active.enabled, own.tooltip)
            elif active.node is not self:
                shown[key] = active

        def width(active: ActiveBinding) -> int:  # as the compact footer draws it: "key description "
            return len(self.app.get_key_display(active.binding)) + len(active.binding.description) + 2

        room = self.size.width - FOOTER_PALETTE_WIDTH
        for action in reversed(wanted):
            if sum(width(active) for active in shown.values() if active.binding.show) <= room:
                break
            shown = {key: active for key, active in shown.items()
                     if not (active.node is self and active.binding.action == action)}
        return shown

    _footer_actions: list[str] | None = None

    def follow_row(self) -> None:
        """The footer follows the selected row: called when it moves or changes (redrawn only if its keys do)."""
        wanted = self.row_actions()
        if wanted != self._footer_actions:
            self._footer_actions = wanted
            self.refresh_bindings()

    def preview_line(self) -> InfoLine | None:
        """The selected row's preview under the table; None while the screen is still being composed or is
        already torn down (a change can come then)."""
        return next(self.query("#preview").results(InfoLine), None)

    def on_live_table_highlighted(self, event: LiveTable.Highlighted) -> None:
        self.follow_row()

    _focus_request = None  # a row to put the cursor on as soon as it is listed

    def on_mount(self) -> None:
        if self.store.loaded:
            self.reload()

    def focus_row(self, key) -> None:
        """Put the cursor on a row (now, or as soon as the live updates list it): a model just started
        from another screen, a deployment just made."""
        self._focus_request = key
        if self.is_mounted:
            self.honour_focus_request()

    def honour_focus_request(self) -> None:
        if self._focus_request is not None and self.table.move_to_key(self._focus_request):
            self._focus_request = None
            self.table.focus()

    def on_screen_resume(self) -> None:
        self.query_one(NavBar).refresh()

    @property
    def db(self) -> Database:
        """The database, for workers; it is opened after the first paint."""
        if self.app.db is None:
            raise EngineError("still opening the database; try again in a moment")
        return self.app.db

    @property
    def table(self) -> LiveTable:
        return self.query_one("#table", LiveTable)

    @property
    def filter_words(self) -> list[str]:
        return self.query_one(FilterBar).value.lower().split()

    def on_input_changed(self, event: Input.Changed) -> None:
        if isinstance(event.input, FilterBar):
            self.apply_filter()

    def action_focus_filter(self) -> None:
        self.query_one(FilterBar).focus()

    def apply_filter(self) -> None:
        """Show the rows that the filter bar (and any other filter of the screen) lets through."""

    # Data hooks, called by the app on the UI thread; each screen patches what it shows.
    def reload(self) -> None: ...

    def models_changed(self, changed: set[int], gone: set[int], repos: set[str]) -> None: ...

    def deployments_changed(self, changed: set[int], gone: set[int]) -> None: ...

    def load_changed(self, deployment_ids: set[int]) -> None:
        """The Ready deployments' load history has a new reading (app.store.load)."""

    def gpus_changed(self) -> None:
        """A new reading of the GPUs (app.store.gpus)."""
        self.query_one(GpuStrip).show(self.store.gpus, self.store.gpu_history)
