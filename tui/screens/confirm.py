"""ConfirmDialog: a yes/no question for irreversible actions; `escape` or `n` says no. ChoiceDialog: a
question with more answers than yes, each with its key; `escape` or `n` says none of them."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [
        Binding("escape,n", "answer(False)", "Cancel"),
        Binding("y", "answer(True)", "Confirm"),
    ]

    def __init__(self, title: str, message: str, confirm_label: str = "Delete", variant: str = "error"):
        """`variant`: the confirm button's look; "error" for what cannot be undone."""
        super().__init__(classes="dialog")
        self.title_text, self.message, self.confirm_label, self.variant = title, message, confirm_label, variant

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.title_text), classes="dialog-title")
            yield Static(Text(self.message), classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.confirm_label} (y)", variant=self.variant, id="confirm")
                yield Button("Cancel (n)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()  # the safe choice is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class ChoiceDialog(ModalScreen[str | None]):
    """Returns the chosen answer's id, or None."""

    BINDINGS = [Binding("escape,n", "answer(None)", "Cancel")]

    def __init__(self, title: str, message: str, answers: list[tuple[str, str, str]]):
        """`answers`: (id, label, key) each, the first being the primary one."""
        super().__init__(classes="dialog")
        self.title_text, self.message, self.answers = title, message, answers

    def on_key(self, event) -> None:
        answer = next((answer_id for answer_id, _label, key in self.answers if key == event.key), None)
        if answer is not None:
            event.stop()
            self.dismiss(answer)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(Text(self.title_text), classes="dialog-title")
            yield Static(Text(self.message), classes="dialog-body")
            with Horizontal(classes="dialog-buttons"):
                for i, (answer_id, label, key) in enumerate(self.answers):
                    yield Button(f"{label} ({key})", variant="primary" if i == 0 else "default", id=answer_id)
                yield Button("Cancel (n)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_answer(self, answer: str | None) -> None:
        self.dismiss(answer)
