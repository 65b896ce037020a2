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

    def __init__(self, what: str, initial: str = "", **kwargs):
        super().__init__(**kwargs)
        self.what = what  # "deploy", "fine-tune": said in the tooltips
        self.initial = initial  # CONTEXT/NAMESPACE to start on (where an adapter's files are, say)
        self.namespaces: dict[str, str] = {}  # each context's own namespace

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row", id="target-row"):
            yield Label("Target", classes="form-label")
            yield Select([("this machine", "")], value="", allow_blank=False, id="target", compact=True,
                         tooltip="This machine, or a Kubernetes context from your kubeconfig")
        with Horizontal(classes="form-row", id="namespace-row"):
            yield Label("Namespace", classes="form-label")
            yield Input(placeholder="default", id="namespace", compact=True,
                        tooltip=f"The namespace on the cluster to {self.what} in (empty: the context's own)")

    def on_mount(self) -> None:
        self.display = False
        self.query_one("#namespace-row").display = False
        self.load()

    @work(thread=True, exclusive=True, group="targets", exit_on_error=False)
    def load(self) -> None:
        from engine.kube.cluster import kubeconfig_path, namespaces

        if kubeconfig_path() is None:
            return
        try:
            found = namespaces()
        except EngineError as exc:
            self.app.call_from_thread(self.notify, str(exc), title="Kubernetes targets", severity="warning")
            return
        if found:
            self.app.call_from_thread(self._show, found)

    def _show(self, found: dict[str, str]) -> None:
        self.namespaces = found
        select = self.query_one("#target", Select)
        select.set_options([("this machine", ""), *((f"{n} (Kubernetes)", n) for n in found)])
        self.display = True
        context, _, namespace = self.initial.partition("/")
        if context in found:
            select.value = context
            self.query_one("#namespace", Input).value = namespace

    @property
    def value(self) -> str:
        """'' for this machine, else CONTEXT/NAMESPACE."""
        context = self.query_one("#target", Select).value
        if not context or context == Select.NULL:
            return ""
        namespace = self.query_one("#namespace", Input).value.strip() or self.namespaces.get(context, "default")
        return f"{context}/{namespace}"

    @on(Select.Changed, "#target")
    @on(Input.Changed, "#namespace")
    def _changed(self) -> None:
        context = self.query_one("#target", Select).value
        self.query_one("#namespace", Input).placeholder = self.namespaces.get(context, "default") \
            if isinstance(context, str) else "default"
        self.query_one("#namespace-row").display = bool(self.value)
        self.post_message(self.Changed(self.value))
