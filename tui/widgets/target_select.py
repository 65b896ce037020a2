"""TargetSelect: where work runs — this machine, a Kubernetes context of the user's kubeconfig (with a
namespace), or a partition of the SLURM cluster this machine submits to — and the chosen target's own
options (an image; an account, a time limit, …), one form row each. Its rows show only when there is a
target besides this machine (listed in a thread: the kubeconfig is read, SLURM is asked); an option's row
only while a target of its kind is chosen. Posts Changed when the target or one of its options changes."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select

from engine import targets


class TargetSelect(Vertical):
    DEFAULT_CSS = "TargetSelect { height: auto; }"

    class Changed(Message):
        def __init__(self, target: str, kind: str):
            super().__init__()
            self.target, self.kind = target, kind

    def __init__(self, what: str, initial: str = "", **kwargs):
        super().__init__(**kwargs)
        self.what = what  # "deploy", "finetune": which options apply, and said in the tooltips
        self.initial = initial  # a spec to start on (where a model's files are, say)
        self.found: dict[str, targets.Choice] = {"": targets.Choice("", "this machine", "local")}

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row", id="target-row"):
            yield Label("Target", classes="form-label")
            yield Select([("this machine", "")], value="", allow_blank=False, id="target", compact=True,
                         tooltip="This machine, a Kubernetes context from your kubeconfig, or a SLURM partition")
        with Horizontal(classes="form-row", id="namespace-row"):
            yield Label("Namespace", classes="form-label")
            yield Input(placeholder="default", id="namespace", compact=True,
                        tooltip=f"The namespace on the cluster to {self.verb} in (empty: the context's own)")
        for option, kind in targets.option_fields():
            if self.what in option.uses:
                with Horizontal(classes=f"form-row target-option kind-{kind.KIND}", id=f"{option.name}-row"):
                    yield Label(option.label, classes="form-label")
                    yield Input(placeholder=kind.option_placeholder(option), id=option.name, compact=True,
                                tooltip=option.help)

    @property
    def verb(self) -> str:
        return "fine-tune" if self.what == "finetune" else self.what

    def on_mount(self) -> None:
        self.display = False
        self._show_rows()
        self.load()

    @work(thread=True, exclusive=True, group="targets", exit_on_error=False)
    def load(self) -> None:
        found, problems = targets.choices()
        for problem in problems:
            self.app.call_from_thread(self.notify, problem, title="Targets", severity="warning")
        if len(found) > 1:
            self.app.call_from_thread(self._show, found)

    def _show(self, found: list[targets.Choice]) -> None:
        self.found = {choice.spec: choice for choice in found}
        select = self.query_one("#target", Select)
        select.set_options([(choice.label, choice.spec) for choice in found])
        self.display = True
        context, _, namespace = self.initial.partition("/")
        if self.initial in self.found:
            select.value = self.initial
        elif context in self.found:  # a Kubernetes CONTEXT/NAMESPACE
            select.value = context
            self.query_one("#namespace", Input).value = namespace

    @property
    def choice(self) -> targets.Choice:
        spec = self.query_one("#target", Select).value
        return self.found.get(spec if isinstance(spec, str) else "", self.found[""])

    @property
    def kind(self) -> type[targets.Target]:
        return targets.kind(self.choice.kind)

    @property
    def value(self) -> str:
        """The chosen target's spec: '' for this machine, CONTEXT/NAMESPACE, slurm:PARTITION."""
        choice = self.choice
        if choice.kind != "kubernetes":
            return choice.spec
        namespace = self.query_one("#namespace", Input).value.strip() or choice.default_namespace or "default"
        return f"{choice.spec}/{namespace}"

    @property
    def options(self) -> dict[str, str]:
        """The chosen target's options as typed (empty ones left out: its defaults)."""
        return {option.name: text for option in self.kind.OPTIONS if self.what in option.uses
                if (text := self.query_one(f"#{option.name}", Input).value.strip())}

    def _show_rows(self) -> None:
        choice = self.choice
        self.query_one("#namespace", Input).placeholder = choice.default_namespace or "default"
        self.query_one("#namespace-row").display = choice.kind == "kubernetes"
        for row in self.query(".target-option"):
            row.display = row.has_class(f"kind-{choice.kind}")

    @on(Select.Changed, "#target")
    @on(Input.Changed)
    def _changed(self, event: Message) -> None:
        event.stop()  # the dialog hears the one Changed below, not each field's own
        self._show_rows()
        self.post_message(self.Changed(self.value, self.choice.kind))
