"""DeployDrawer (`p`): how to serve a model, with the plan checked live before anything starts.

A drawer on the right: where it runs (this machine or another target, with that target's own options),
backend, GPUs, tensor parallel, dtype, max model length, GPU memory fraction, port, bind address and
served name; a target shows the rows of the settings it uses. Empty fields take the defaults shown in
grey. Every change asks the engine for the plan again (off the UI thread): what will run where, the
memory fit (fits / tight / does not fit) or who places it, and warnings such as an address reachable from
other machines. A model that does not fit can still be deployed by ticking the override. The drawer closes
only once the deployment has started, and returns its id; nothing typed is lost on an error.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from catalog.states import ModelKind, ModelState
from engine.backends import FIELD_LABELS, DeploySettings
from engine.errors import EngineError
from engine.format import human_bytes
from tui.screens.base import FieldHelp, PrimaryButton, ReportsWorkerErrors
from tui.widgets.gpu_select import GpuSelect
from tui.widgets.target_select import TargetSelect, initial_target

if TYPE_CHECKING:
    from engine.deployments import DeployPlan
    from engine.gpus import Gpu

LABELS = {"name": "Deployment name", "gpu_count": FIELD_LABELS["gpus"], "adapters": "Adapters"}  # the rest: settings'
ADAPTERS_HELP = ("Ready adapters of the same base, served beside it, each under its own name (a request's model "
                 "chooses): their names, separated by commas")
PLAN_DELAY_S = 0.3  # wait for typing to pause before asking for the plan again
VERDICT_STYLES = {"fits": "bold green", "tight": "bold yellow", "does not fit": "bold red"}
BACKENDS = [("auto: vLLM on a GPU, else built-in", "auto"), ("vLLM", "vllm"),
            ("built-in server (transformers)", "transformers")]
DTYPES = [("auto: as stored", "auto"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "float32")]
# The typed fields: id, placeholder (the default), help shown while the field has focus.
TYPED = [
    ("name", "", "How the deployment is listed (default: the served name); two at once need two names"),
    ("tensor_parallel", "1", "GPUs to split the model over; vLLM only, at most the GPUs chosen"),
    ("max_model_len", "the model's own", "Longest prompt + reply in tokens; lower it to fit a smaller GPU"),
    ("gpu_memory_fraction", "0.9", "Share of each GPU's memory vLLM may take (weights + KV cache); vLLM only"),
    ("port", "a free one", "The port to listen on; empty or 0 picks a free one"),
    ("host", "127.0.0.1", "Bind address: 127.0.0.1 keeps it on this machine; 0.0.0.0 opens it to the network"),
    ("served_name", "", "The model name clients send in requests"),
    ("adapters", "none", ADAPTERS_HELP),
    ("max_lora_rank", "from the adapters", "The highest adapter rank it takes, now or loaded while it serves (vLLM "
                                           "reserves room for it); empty: any on the built-in server"),
]
GPU_COUNT_HELP = "How many GPUs its job gets (0: its CPUs; auto: the tensor-parallel size where there are GPUs)"
VLLM_ONLY = ("tensor_parallel", "gpu_memory_fraction")
# The rows of the common settings, each shown where the chosen target uses it (its DEPLOY_FIELDS).
COMMON = ("backend", "gpus", "dtype", "tensor_parallel", "max_model_len", "gpu_memory_fraction", "port", "host",
          "served_name", "max_lora_rank")


class DeployDrawer(PrimaryButton, FieldHelp, ReportsWorkerErrors, ModalScreen[int | None]):
    PRIMARY = "start"
    AUTO_FOCUS = "#backend"
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+s", "start", "Deploy"),
    ]

    def __init__(self, model_id: int | str):
        """`model_id`: a custom model's id, or the repo id of a Hub model that the chosen target downloads."""
        super().__init__(classes="dialog drawer")
        self.model_id = model_id
        from engine.backends import vllm_available

        self._vllm_here = vllm_available()
        self._plan_timer = None
        self._starting = False

    def compose(self) -> ComposeResult:
        row = self.app.store.models.get(self.model_id)
        entry = self.app.store.community.get(self.model_id) if isinstance(self.model_id, str) else None
        name = row.model.name if row else entry.name if entry else str(self.model_id)
        with Vertical(id="dialog", classes="drawer"):
            yield Label(f"Deploy {name}", classes="dialog-title")
            yield Static(self._about(row, entry), id="about", classes="form-note drawer-note")
            with VerticalScroll(classes="dialog-scroll"):
                yield TargetSelect("deploy", initial=initial_target(self.app.store, self.model_id))
                with Horizontal(classes="form-row", id="backend-row"):
                    yield Label(FIELD_LABELS["backend"], classes="form-label")
                    yield Select(BACKENDS, value="auto", allow_blank=False, id="backend", compact=True,
                                 tooltip="auto picks vLLM where a CUDA GPU and vLLM are installed")
                with Horizontal(classes="form-row", id="gpus-row"):
                    yield Label(FIELD_LABELS["gpus"], classes="form-label")
                    yield GpuSelect(id="gpus", tooltip="Which GPUs serve the model")
                with Horizontal(classes="form-row", id="gpu_count-row"):  # a job's GPUs, on a cluster
                    yield Label(LABELS["gpu_count"], classes="form-label")
                    yield Input(placeholder="auto", id="gpu_count", compact=True, tooltip=GPU_COUNT_HELP)
                with Horizontal(classes="form-row", id="dtype-row"):
                    yield Label(FIELD_LABELS["dtype"], classes="form-label")
                    yield Select(DTYPES, value="auto", allow_blank=False, id="dtype", compact=True,
                                 tooltip="The weights' number type while serving")
                for field_id, placeholder, help_text in TYPED:
                    with Horizontal(classes="form-row", id=f"{field_id}-row"):
                        yield Label(LABELS.get(field_id) or FIELD_LABELS[field_id], classes="form-label")
                        if field_id == "adapters":
                            placeholder, help_text = self._adapters_hint(row)
                        yield Input(placeholder=placeholder or name, id=field_id, compact=True, tooltip=help_text)
                yield Static("Checking…", id="plan", classes="drawer-plan")
            yield Checkbox("Deploy even if it does not fit", id="force", compact=True)
            yield Static("", id="error", classes="dialog-error")
            yield Static("", id="field-help", classes="form-note drawer-note drawer-help")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Deploy (ctrl+s)", variant="primary", id="start", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def _adapters_hint(self, row) -> tuple[str, str]:
        """The Adapters field's placeholder and help: the Ready adapters of this model's base, by name."""
        if row is None:
            return "none", ADAPTERS_HELP
        m = row.model
        base_id = m.base_id if m.kind == ModelKind.ADAPTER else m.id
        ready = [r.model.name for r in self.app.store.models.values() if r.model.kind == ModelKind.ADAPTER
                 and r.model.base_id == base_id and r.model.state == ModelState.READY and r.model.id != m.id]
        if not ready:
            return "none", ADAPTERS_HELP + " (its base has no other Ready adapter)"
        shown = ", ".join(ready[:3]) + (f" (+{len(ready) - 3})" if len(ready) > 3 else "")
        return f"none; e.g. {shown}", ADAPTERS_HELP + ": " + ", ".join(ready)

    def _adapters(self) -> list[str]:
        return [part for part in self.query_one("#adapters", Input).value.replace(",", " ").split() if part]

    @staticmethod
    def _about(row, entry=None) -> Text:
        if row is None and entry is not None:
            from engine.format import human_params

            return Text(f"{entry.repo_id} · {human_params(entry.params)} parameters · not on this machine: a target "
                        "that downloads it itself runs it")
        if row is None:
            return Text("This model was deleted.")
        m = row.model
        text = Text(f"{m.kind.value} · {human_bytes(m.size_bytes)}")
        if row.base_name and m.kind == ModelKind.ADAPTER:
            text.append(f" · served on its base {row.base_name}")
        elif row.base_name:  # a merged model stands alone: its base is only where it came from
            text.append(f" · merged from {row.base_name}")
        if m.state == ModelState.FAILED:
            text.append(f" · Failed: {m.reason or 'no reason given'}", style="red")
        return text

    def models_changed(self, changed: set[int], gone: set[int], repos: set[str]) -> None:
        """The model finished downloading, failed or went while the drawer is open: say so and plan again."""
        if self.model_id in changed or self.model_id in gone:
            row = self.app.store.models.get(self.model_id)
            self.query_one("#about", Static).update(self._about(row))
            self._schedule_plan()

    def on_mount(self) -> None:
        self.query_one("#force", Checkbox).display = False
        self._show_rows()

    def _target(self) -> str:
        return self.query_one(TargetSelect).value

    def _shown(self, field_id: str) -> bool:
        """Whether the chosen target uses this setting (its GPUs: counted for a cluster's job); vLLM's own
        settings only where vLLM can serve it (here: vLLM installed, and the backend not the built-in one)."""
        kind = self.query_one(TargetSelect).kind
        if field_id in ("gpus", "gpu_count"):
            return "gpus" in kind.DEPLOY_FIELDS and (kind.GPUS == "here") == (field_id == "gpus")
        if field_id in VLLM_ONLY and kind.GPUS == "here" and (
                not self._vllm_here or self.query_one("#backend", Select).value == "transformers"):
            return False
        return field_id not in COMMON or field_id in kind.DEPLOY_FIELDS

    def _show_rows(self) -> None:
        for field_id in (*COMMON, "gpu_count"):
            self.query_one(f"#{field_id}-row").display = self._shown(field_id)
        if self.focused is not None and self.focused not in self.focus_chain:
            self.query_one("#target").focus()  # its row was hidden (the backend, focused first, on a cluster)

    def on_gpu_select_loaded(self, event: GpuSelect.Loaded) -> None:
        self._schedule_plan()  # the first plan waits for the GPUs

    # -- the settings and their plan ----------------------------------------------------------------

    def _settings(self) -> tuple[DeploySettings, dict[str, str]]:
        values = {field_id: self.query_one(f"#{field_id}", Input).value for field_id, _, _ in TYPED
                  if field_id not in LABELS and self._shown(field_id)}
        values |= {select_id: str(self.query_one(f"#{select_id}", Select).value)
                   for select_id in ("backend", "gpus", "dtype") if self._shown(select_id)}
        if self._shown("gpu_count"):
            values["gpus"] = self.query_one("#gpu_count", Input).value
        values["target"] = self._target()
        settings, errors = DeploySettings.from_strings(values)
        return dataclasses.replace(settings, options=self.query_one(TargetSelect).options), errors

    def _deployment_name(self) -> str | None:
        return self.query_one("#name", Input).value.strip() or None

    def _show_problems(self, errors: dict[str, str]) -> None:
        for field_id, _, _ in TYPED:
            self.query_one(f"#{field_id}", Input).set_class(field_id in errors, "-invalid")
        self.query_one("#gpu_count", Input).set_class("gpus" in errors, "-invalid")  # a job's GPUs, counted
        self.query_one("#error", Static).update(Text("; ".join(errors.values())))

    @on(Input.Changed)
    @on(Select.Changed)
    def settings_changed(self, event: Input.Changed | Select.Changed) -> None:
        if event.control.id == "backend":  # vLLM's own settings come and go with it
            self._show_rows()
        self._schedule_plan()

    def on_target_select_changed(self, event: TargetSelect.Changed) -> None:
        self._show_rows()
        self._schedule_plan()

    def _schedule_plan(self) -> None:
        if self._plan_timer is not None:
            self._plan_timer.stop()
        self._plan_timer = self.set_timer(PLAN_DELAY_S, self.check_plan)

    def check_plan(self) -> None:
        gpus = self.query_one(GpuSelect).gpus
        if gpus is None:
            return  # asked again once the GPUs are known
        settings, errors = self._settings()
        self._show_problems(errors)
        if errors:
            self.query_one("#plan", Static).update("")
            return
        self._plan(settings, gpus, self._deployment_name(), self._adapters())

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def _plan(self, settings: DeploySettings, gpus: list[Gpu], name: str | None, adapters: list[str]) -> None:
        from engine import deployments

        try:
            checked = deployments.plan(self.app.db, self.model_id, settings, gpus, name, adapters)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it belongs on the error line, not a toast
            self.app.call_from_thread(self._show_plan, None, str(exc) if isinstance(exc, EngineError) else
                                      f"{type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self._show_plan, checked, "")

    def _show_plan(self, checked: DeployPlan | None, problem: str) -> None:
        self.query_one("#error", Static).update(Text(problem))
        force = self.query_one("#force", Checkbox)
        if checked is None:
            self.query_one("#plan", Static).update("")
            force.display = False
            return
        runs = checked.serving.summary
        if self._shown("host"):  # where it listens is this machine's to say
            chosen = self.query_one("#port", Input).value.strip() not in ("", "0")
            runs += (f", {checked.settings.host}:{checked.settings.port}" if chosen
                     else f", {checked.settings.host}, a free port")
        if checked.fit is None:  # where its scheduler judges the fit
            verdict = "fits"
            text = Text.assemble(("Runs ", "dim"), runs, "\n", ("Placed ", "dim"), checked.serving.placed_by)
        else:
            verdict = checked.fit.verdict
            text = Text.assemble(("Runs ", "dim"), runs, "\n", ("Memory ", "dim"), (verdict, VERDICT_STYLES[verdict]),
                                 f": {checked.fit.needs}")
        if checked.serving.chosen_because:
            text.append("\nChosen ", style="dim").append(checked.serving.chosen_because)
        if extra := [name for name, adapter in checked.adapters if adapter.id != checked.model.id]:
            text.append("\nServes ", style="dim").append(
                f"{checked.served_name}" if checked.model.kind != ModelKind.ADAPTER else
                f"{checked.served_name}, its base as {checked.served_name}-base").append(f", and {', '.join(extra)}")
        for warning in checked.warnings:
            text.append(f"\n⚠ {warning}", style="yellow")
        self.query_one("#plan", Static).update(text)
        force.display = verdict == "does not fit"

    # -- starting -----------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()  # enter finishes a field; ctrl+s (or the button) deploys

    def action_start(self) -> None:
        if self._starting:  # enter and ctrl+s also reach here while a start is under way
            return
        settings, errors = self._settings()
        if errors:
            self._show_problems(errors)
            return
        self.query_one("#error", Static).update("Checking and starting…")
        self._starting = True
        self.query_one("#start", Button).disabled = True
        self._start(settings, self._deployment_name(), self.query_one("#force", Checkbox).value)

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def _start(self, settings: DeploySettings, name: str | None, force: bool, replace: bool = False) -> None:
        from engine import deployments

        try:
            checked = deployments.plan(self.app.db, self.model_id, settings, name=name,
                                       adapters=self.app.call_from_thread(self._adapters))
            if checked.replaces and not replace:  # one row per name: ask before the ended one goes
                self.app.call_from_thread(self._ask_to_replace, checked.replaces[-1], settings, name, force)
                return
            deployment, _job = deployments.start(self.app.db, checked, force, replace)
        except Exception as exc:  # noqa: BLE001 - the drawer must come back usable, whatever went wrong
            self.app.call_from_thread(self._refused, str(exc) if isinstance(exc, EngineError) else
                                      f"{type(exc).__name__}: {exc}")
            return
        self.app.call_from_thread(self.dismiss, deployment.id)

    def _ask_to_replace(self, ended, settings: DeploySettings, name: str | None, force: bool) -> None:
        from tui.screens.confirm import ConfirmDialog

        def answered(yes: bool) -> None:
            if yes:
                self._start(settings, name, force, replace=True)
            else:
                self._refused(f"A {ended.state.value} deployment is named {ended.name!r}: choose another name, or "
                              "start that one again (r in Active deployments)")

        self.app.push_screen(ConfirmDialog(
            f"Replace the {ended.state.value} deployment {ended.name}?",
            "One deployment per name: its record and chat conversations go, and this one takes its name. To "
            "start it again with its own settings and key instead, use r in Active deployments.",
            confirm_label="Replace"), answered)

    def _refused(self, reason: str) -> None:
        self.query_one("#error", Static).update(Text(reason))
        self._starting = False
        self.query_one("#start", Button).disabled = False
