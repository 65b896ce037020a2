"""TargetSelect: where work runs — this machine, or a Kubernetes context of the user's kubeconfig and a
namespace. Its two form rows show only when a kubeconfig has contexts (read in a thread, so the client
library is imported only then); the namespace row only while a cluster is chosen. Posts Changed when
the target changes."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Select

from engine.errors import EngineError


class TargetSelect(Vertical):
    DEFAULT_CSS = "TargetSelect { height: auto; }"

    class Changed(Message):
        def __init__(self, target: str):
            super().__init__()
            self.target = target

    def __init__(self, what: str, **kwargs):
        super().__init__(**kwargs)
        self.what = what  # "deploy", "fine-tune": said in the tooltips

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row", id="target-row"):
            yield Label("Target", classes="form-label")
            yield Select([("this machine", "")], value="", allow_blank=False, id="target", compact=True,
                         tooltip="This machine, or a Kubernetes context from your kubeconfig")
        with Horizontal(classes="form-row", id="namespace-row"):
            yield Label("Namespace", classes="form-label")
            yield Input(placeholder="default", id="namespace", compact=True,
                        tooltip=f"The namespace on the cluster to {self.what} in")

    def on_mount(self) -> None:
        self.display = False
        self.query_one("#namespace-row").display = False
        self.load()

    @work(thread=True, exclusive=True, group="targets", exit_on_error=False)
    def load(self) -> None:
        from engine.kube.cluster import contexts, kubeconfig_path

        if kubeconfig_path() is None:
            return
        try:
            names, _current = contexts()
        except EngineError as exc:
            self.app.call_from_thread(self.notify, str(exc), title="Kubernetes targets", severity="warning")
            return
        if names:
            self.app.call_from_thread(self._show, names)

    def _show(self, names: list[str]) -> None:
        self.query_one("#target", Select).set_options([("this machine", ""), *((f"{n} (Kubernetes)", n) for n in names)])
        self.display = True

    @property
    def value(self) -> str:
        """'' for this machine, else CONTEXT/NAMESPACE."""
        context = self.query_one("#target", Select).value
        if not context or context == Select.NULL:
            return ""
        return f"{context}/{self.query_one('#namespace', Input).value.strip() or 'default'}"

    @on(Select.Changed, "#target")
    @on(Input.Changed, "#namespace")
    def _changed(self) -> None:
        self.query_one("#namespace-row").display = bool(self.value)
        self.post_message(self.Changed(self.value))
