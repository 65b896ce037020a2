"""EndpointDialog (`a` in Active deployments): list an external OpenAI-compatible endpoint to chat with.

Its API key is not stored by modeldeck: name the environment variable that holds it (read each time it is
needed), or type it to keep it in the system keyring. The endpoint is asked for its models before it is
listed, so a wrong URL or key is said here, with nothing lost.
"""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from engine.errors import EngineError
from tui.screens.base import PrimaryButton, ReportsWorkerErrors

FIELDS = [
    ("name", "Name", "team-llm", "how it is listed (letters, digits, . _ -)", False),
    ("url", "Base URL", "http://host:8000/v1", "the OpenAI-compatible API's base, usually ending in /v1", False),
    ("model", "Model", "the only one it serves", "the model name to send; empty when it serves exactly one", False),
    ("key_env", "Key variable", "OPENAI_API_KEY", "an environment variable holding the key (read when needed)", False),
    ("key", "or key", "kept in the system keyring", "the key itself, kept in the system keyring, not in modeldeck", True),
]


class EndpointDialog(PrimaryButton, ReportsWorkerErrors, ModalScreen[int | None]):
    PRIMARY = "add"
    AUTO_FOCUS = "#name"
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "add", "Add")]

    def __init__(self):
        super().__init__(classes="dialog")
        self._adding = False

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="finetune"):
            yield Label("Add an external endpoint", classes="dialog-title")
            for field_id, label, placeholder, help_text, secret in FIELDS:
                with Horizontal(classes="form-row"):
                    yield Label(label, classes="form-label")
                    yield Input(placeholder=placeholder, id=field_id, compact=True, password=secret, tooltip=help_text)
            yield Static("The key never goes into modeldeck's database or logs.", classes="form-note")
            yield Static("", id="error", classes="dialog-error")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Add", variant="primary", id="add", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _value(self, field_id: str) -> str:
        return self.query_one(f"#{field_id}", Input).value.strip()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_add()

    def action_add(self) -> None:
        if self._adding:
            return
        if not self._value("name") or not self._value("url"):
            self.query_one("#error", Static).update("Give a name and the base URL.")
            return
        self._adding = True
        self.query_one("#error", Static).update("Asking the endpoint for its models…")
        self._add(self._value("name"), self._value("url"), self._value("model") or None,
                  self._value("key_env") or None, self._value("key") or None)

    # The description is given: by default it would show the arguments, the key among them, in Textual's log.
    @work(thread=True, exclusive=True, exit_on_error=False, description="add an external endpoint")
    def _add(self, name: str, url: str, model: str | None, key_env: str | None, key: str | None) -> None:
        from engine import endpoints

        try:
            deployment = endpoints.add(self.app.db, name, url, model, key_env, key)
        except EngineError as exc:
            self.app.call_from_thread(self._refused, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - the dialog must come back usable; the type says enough
            self.app.call_from_thread(self._refused, f"that did not work ({type(exc).__name__}); check the URL")
            return
        self.app.call_from_thread(self.dismiss, deployment.id)

    def _refused(self, reason: str) -> None:
        self._adding = False
        self.query_one("#error", Static).update(Text(reason))
