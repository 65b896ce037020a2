"""ConnectDialog (`enter` on a Ready deployment; Connect on a deployed model): what an application needs
to use the deployment. Base URL, served model name, API key (masked; `r` reveals), and snippets ready to
paste: curl, Python with the openai SDK, environment variables. Each copies to the clipboard through the
terminal (OSC 52), so it works over SSH; a copied snippet carries the real key. For a loopback endpoint
on a machine reached over SSH, the `ssh -L` command that makes it reachable from a laptop. `c` chats.
"""

from __future__ import annotations

from rich.syntax import Syntax
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from engine.errors import EngineError
from engine.format import masked_key
from tui.screens.details import fields_table


class ConnectDialog(ModalScreen[str | None]):
    """Returns "chat" when the user asks to chat from here."""

    AUTO_FOCUS = ".dialog-scroll"
    BINDINGS = [
        Binding("escape,q", "dismiss(None)", "Close"),
        Binding("r", "reveal", "Reveal key"),
        Binding("u", "copy('url')", "Copy URL"),
        Binding("k", "copy('key')", "Copy key"),
        Binding("1", "copy('1')", "Copy curl", show=False),
        Binding("2", "copy('2')", "Copy Python", show=False),
        Binding("3", "copy('3')", "Copy env", show=False),
        Binding("s", "copy('ssh')", "Copy ssh -L", show=False),
        Binding("c", "chat", "Chat"),
    ]

    def __init__(self, deployment_id: int, model: str | None = None):
        """`model`: a model the deployment serves beside its own (an adapter), to connect to instead."""
        super().__init__(classes="dialog")
        self.deployment_id, self.model = deployment_id, model
        self.key: str | None = None
        self.revealed = False
        self.problem = ""

    def compose(self) -> ComposeResult:
        dep = self.app.store.deployments[self.deployment_id]
        with Vertical(id="dialog", classes="wide connect"):
            yield Label(f"Connect to {dep.name}", classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                yield Static(id="facts")
                yield Static(id="snippets")
            ssh = " · s ssh" if self._tunnel() else ""
            yield Label(f"esc close · r reveal · u URL · k key · 1-3 snippets{ssh} · c chat", classes="dialog-hint")

    def on_mount(self) -> None:
        self.load_key()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load_key(self) -> None:
        """An external endpoint's key comes from the environment or the keyring (may take a moment)."""
        from engine import endpoints

        dep = self.app.store.deployments[self.deployment_id]
        try:
            self.key = endpoints.api_key(dep)
        except EngineError as exc:
            self.problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the rest of the kit is still shown
            self.problem = f"cannot read the key ({type(exc).__name__})"
        self.app.call_from_thread(self.show)

    def _snippets(self, key: str | None):
        from engine.connect import snippets

        dep = self.app.store.deployments[self.deployment_id]
        return snippets(dep.endpoint, self.model or dep.served_name or dep.name, key)

    def _tunnel(self) -> tuple[str, str] | None:
        from engine import targets

        dep = self.app.store.deployments[self.deployment_id]
        return targets.of_deployment(dep).laptop_tunnel(dep)

    def show(self) -> None:
        dep = self.app.store.deployments[self.deployment_id]
        key_text = (self.key or "none") if self.revealed else masked_key(self.key)
        fields = [("Base URL", dep.endpoint), ("Model", self.model or dep.served_name or dep.name),
                  ("API key", Text(key_text) if not self.problem else Text(self.problem, style="red"))]
        from engine import targets

        for label, value, hint in targets.of_deployment(dep).connect_fields(dep):
            fields.append((label, Text.assemble(value, (hint, "dim"))))
        if tunnel := self._tunnel():
            command, url = tunnel
            there = "the same URL" if url == dep.endpoint else url
            fields.append(("From a laptop", Text.assemble(command, (f"  (s copies; then use {there} there)", "dim"))))
        self.query_one("#facts", Static).update(fields_table(fields))
        shown_key = self.key if self.revealed or not self.key else masked_key(self.key)
        blocks = []
        for snippet in self._snippets(shown_key):
            blocks.append(Text(f"\n{snippet.key}  {snippet.title}", style="bold"))
            lexer = {"curl": "bash", "Environment variables": "bash"}.get(snippet.title, "python")
            blocks.append(Syntax(snippet.text, lexer, theme="ansi_dark", word_wrap=True, background_color="default"))
        from rich.console import Group

        self.query_one("#snippets", Static).update(Group(*blocks))

    def action_reveal(self) -> None:
        self.revealed = not self.revealed
        self.show()

    def action_copy(self, what: str) -> None:
        dep = self.app.store.deployments[self.deployment_id]
        if what == "url":
            self.app.copy_text(dep.endpoint, "URL")
        elif what == "key":
            self.app.copy_text(self.key, "API key", shown=masked_key(self.key))
        elif what == "ssh":
            tunnel = self._tunnel()
            self.app.copy_text(tunnel[0] if tunnel else None, "ssh -L command (the endpoint is reachable as it is)")
        else:
            snippet = next(s for s in self._snippets(self.key) if s.key == what)
            self.app.copy_text(snippet.text, snippet.title, shown=f"the {snippet.title} snippet")

    def action_chat(self) -> None:
        self.dismiss("chat")
