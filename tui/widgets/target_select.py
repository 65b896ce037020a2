"""TargetSelect: where work runs — this machine, or another target of engine/targets (a Kubernetes context
of the user's kubeconfig, a partition of the SLURM cluster this machine submits to) — with the part of
its spec typed beside it (a namespace) and the chosen target's own options (an image; an account, a time
limit, …), one form row each. Its rows show only when there is a target besides this machine (listed in a
thread: the kubeconfig is read, SLURM is asked); a target's rows only while one of its kind is chosen.
Posts Changed when the target or one of its fields changes."""

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
        self.what = what  # "deploy", "finetune": which options apply
        self.initial = initial  # a spec to start on (where a model's files are, say)
        self.found: dict[str, targets.Choice] = {"": targets.here_choice()}

    def compose(self) -> ComposeResult:
        kinds = targets.kinds()
        places = ["this machine", *(kind.WHERE for kind in kinds if kind.WHERE)]
        with Horizontal(classes="form-row", id="target-row"):
            yield Label("Target", classes="form-label")
            yield Select([("this machine", "")], value="", allow_blank=False, id="target", compact=True,
                         tooltip=f"Where it runs: {', '.join(places[:-1])}, or {places[-1]}")
        fields = [(kind.SPEC_FIELD, kind) for kind in kinds if kind.SPEC_FIELD] + [
            (option, kind) for option, kind in targets.option_fields() if self.what in option.uses]
        for field, kind in fields:
            with Horizontal(classes=f"form-row target-field kind-{kind.KIND}", id=f"{field.name}-row"):
                yield Label(field.label, classes="form-label")
                yield Input(placeholder=kind.option_placeholder(field), id=field.name, compact=True,
                            tooltip=field.help)

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
        if self.initial:
            spec, field_value = targets.resolve(self.initial).choice_of(self.initial)
            if spec in self.found:
                select.value = spec
                if (field := targets.kind(self.found[spec].kind).SPEC_FIELD) is not None:
                    self.query_one(f"#{field.name}", Input).value = field_value

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
        field = self.kind.SPEC_FIELD
        return self.kind.spec_of(self.choice, self.query_one(f"#{field.name}", Input).value.strip() if field else "")

    @property
    def options(self) -> dict[str, str]:
        """The chosen target's options as typed (empty ones left out: its defaults)."""
        return {option.name: text for option in self.kind.OPTIONS if self.what in option.uses
                if (text := self.query_one(f"#{option.name}", Input).value.strip())}

    def _show_rows(self) -> None:
        choice = self.choice
        if (field := self.kind.SPEC_FIELD) is not None:
            self.query_one(f"#{field.name}", Input).placeholder = choice.field_default or field.placeholder
        for row in self.query(".target-field"):
            row.display = row.has_class(f"kind-{choice.kind}")

    @on(Select.Changed, "#target")
    @on(Input.Changed)
    def _changed(self, event: Message) -> None:
        event.stop()  # the dialog hears the one Changed below, not each field's own
        self._show_rows()
        self.post_message(self.Changed(self.value, self.choice.kind))


def initial_target(store, model_ref: int | str | None) -> str:
    """Where a dialog's Target starts: where a custom model's files are (a cluster that fine-tuned it), or, for
    a Hub model (its repo id), the first target that downloads it itself; else this machine."""
    if isinstance(model_ref, str):
        return next((c.spec for c in store.targets if targets.kind(c.kind).DOWNLOADS), "")
    row = store.models.get(model_ref) if model_ref is not None else None
    home = targets.home_of(row.model) if row is not None else targets.here()
    return "" if home.is_here else home.spec
