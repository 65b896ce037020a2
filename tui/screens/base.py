"""DeckScreen: what the three tab screens share: the nav bar, the footer, and the data hooks."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from tui.store import Store
from tui.widgets.nav import NavBar


class DeckScreen(Screen):
    TAB_TITLE = ""
    MODE = ""
    AUTO_FOCUS = "LiveTable"  # keys act on the table; `/` moves to the filter bar

    @property
    def store(self) -> Store:
        return self.app.store

    def compose_nav(self) -> ComposeResult:
        yield NavBar(self.MODE)

    def compose_footer(self) -> ComposeResult:
        yield Footer(compact=True)

    def on_mount(self) -> None:
        if self.store.loaded:
            self.reload()

    def on_screen_resume(self) -> None:
        self.query_one(NavBar).refresh()

    # Data hooks, called by the app on the UI thread; each screen patches what it shows.
    def reload(self) -> None: ...

    def models_changed(self, changed: set[int], gone: set[int], repos: set[str]) -> None: ...

    def deployments_changed(self, changed: set[int], gone: set[int]) -> None: ...
