"""FinetuneDialog (`f`): base model, dataset, output name, where it runs (this machine's GPUs, or another
target with its own options and a GPU count), method and the LoRA hyperparameters.

Empty fields take the sound defaults shown in grey, so picking a base model and a dataset is enough.
The dataset is read and checked as soon as it is named (its first bad line shown here), with token
counts from the base model's tokenizer and how long the run will train (engine/estimates.py). Nothing
is lost on an error: the dialog closes only once the fine-tune has started, and returns the new
adapter's id.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static
from textual.worker import get_current_worker

from catalog.states import ModelKind, ModelState
from engine.errors import EngineError
from engine.format import job_progress
from engine.hyperparameters import DEFAULT_MAX_LENGTH, Hyperparameters
from tui.screens.base import FieldHelp, PrimaryButton, ReportsWorkerErrors
from tui.screens.file_picker import FilePicker
from tui.widgets.gpu_select import GpuSelect
from tui.widgets.info import InfoLine
from tui.widgets.target_select import TargetSelect, initial_target

# Shown on their own rows above the grid of numbers.
WIDE_FIELDS = ("method", "target_modules")
CHECK_DELAY_S = 0.4  # wait for typing to pause before reading the dataset again
LONG_RUN_S = 30 * 60  # an estimate over this stands out


class FinetuneDialog(PrimaryButton, FieldHelp, ReportsWorkerErrors, ModalScreen[int | None]):
    PRIMARY = "start"
    AUTO_FOCUS = "#dataset"
    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("ctrl+o", "browse", "Browse datasets"),
        Binding("ctrl+s", "start", "Start"),
    ]

    def __init__(self, base_id: int | str | None = None, dataset: str = ""):
        """`base_id`: a custom model's id, or the repo id of a Hub model that the chosen target downloads."""
        super().__init__(classes="dialog")
        self.base_id, self.initial_dataset = base_id, dataset
        self._check_timer = None
        self._rows: tuple[str, int, str] | None = None  # the dataset read last: path, rows, format name
        self._starting = False
        self._local_qlora = False  # a GPU here and bitsandbytes: known once the GPUs are read
        self._counted = None  # the dataset and base counted last: (path, base id, TokenCount, params)
        self._speeds: dict[tuple, tuple[float, str] | None] = {}  # measured: by (base id, on a CPU, target)

    # -- layout -------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        defaults = Hyperparameters()
        with Vertical(id="dialog", classes="wide finetune"):
            yield Label("Fine-tune a model (LoRA)", classes="dialog-title")
            with VerticalScroll(classes="dialog-scroll"):
                with Horizontal(classes="form-row"):
                    yield Label("Base model", classes="form-label")
                    options = self._base_options()
                    yield Select(options, value=self._initial_base(), id="base", compact=True,
                                 prompt="choose one" if options else "no Ready base model: download one (1)")
                with Horizontal(classes="form-row"):
                    yield Label("Dataset", classes="form-label")
                    yield Input(self.initial_dataset, placeholder="path to a .jsonl file (ctrl+o browses)",
                                id="dataset", compact=True)
                yield Static("JSONL: OpenAI chat, ShareGPT, Alpaca or text (detected)",
                             id="dataset-summary", classes="form-note")
                yield Static("", id="token-summary", classes="form-note")
                yield Static("", id="estimate", classes="form-note")  # shown once there is one
                with Horizontal(classes="form-row"):
                    yield Label("Output name", classes="form-label")
                    yield Input(placeholder="BASE-DATASET-lora", id="name", compact=True)
                with Horizontal(classes="form-row"):
                    yield Label("When done", classes="form-label")
                    yield Select(self._serve_on_options(self._initial_base()), value="", allow_blank=False,
                                 id="serve_on", compact=True,
                                 tooltip="Load the adapter onto a running deployment of its base once it is Ready "
                                         "(no restart): requests then name it")
                yield TargetSelect("finetune", initial=initial_target(self.app.store, self.base_id))
                with Horizontal(classes="form-row", id="gpus-row"):
                    yield Label("GPUs", classes="form-label")
                    yield GpuSelect(id="gpus")
                with Horizontal(classes="form-row", id="gpu-count-row"):
                    yield Label("GPUs", classes="form-label")
                    yield Input(placeholder="auto", id="gpu_count", compact=True,
                                tooltip="How many GPUs the fine-tune's pod or batch job gets (0: its CPUs)")
                with Horizontal(classes="form-row"):
                    yield Label("Method", classes="form-label")
                    yield Select([("LoRA", "lora")], value="lora", allow_blank=False, id="method", compact=True)
                with Horizontal(classes="form-row"):
                    yield Label("Target modules", classes="form-label")
                    yield Input(placeholder="the architecture's default", id="target_modules", compact=True)
                with Grid(id="knobs"):
                    for f in Hyperparameters.fields():
                        if f.name in WIDE_FIELDS:
                            continue
                        default = getattr(defaults, f.name)
                        shown = f"auto ({DEFAULT_MAX_LENGTH})" if f.name == "max_length" else (
                            "auto" if f.name == "save_steps" else ("by epochs" if f.name == "max_steps" else f"{default:g}"))
                        with Horizontal(classes="knob"):
                            yield Label(f.metadata["label"], classes="knob-label")
                            yield Input(placeholder=shown, id=f.name, compact=True, tooltip=f.metadata["help"])
            yield Static("", id="error", classes="dialog-error")
            yield InfoLine("", id="field-help", classes="form-note")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Start fine-tune", variant="primary", id="start", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _eligible(self):
        return [row for row in self.app.store.models.values()
                if row.model.kind in (ModelKind.BASE, ModelKind.MERGED)
                and (row.model.state == ModelState.READY
                     or (row.model.state == ModelState.PENDING and row.model.repo_id and row.job is not None))]

    def _base_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = []
        if isinstance(self.base_id, str):  # a Hub model a target downloads itself
            options.append((f"{self.base_id}  (from the Hub: the target downloads it)", self.base_id))
        for row in sorted(self._eligible(), key=lambda r: r.model.name.lower()):
            m = row.model
            state = "Ready" if m.state == ModelState.READY else f"downloading {job_progress(row.job, 'tiny')}".rstrip()
            options.append((f"{m.name}  ({m.kind.value}, {state})", m.id))
        return options

    def _serve_on_options(self, base_id) -> list[tuple[str, str]]:
        """Keep it in Custom, or serve it on one of the running deployments of this base."""
        options = [("keep it in Custom", "")]
        for dep in self.app.store.deployments.values():
            row = self.app.store.models.get(dep.model_id) if dep.model_id is not None else None
            if row is None or dep.backend == "external" or not dep.state.is_live():
                continue
            serves = row.model.base_id if row.model.kind == ModelKind.ADAPTER else row.model.id
            if serves == base_id:
                options.append((f"serve it on {dep.name}", dep.name))
        return options

    def _initial_base(self):
        ids = [row.model.id for row in self._eligible()] + ([self.base_id] if isinstance(self.base_id, str) else [])
        if self.base_id in ids:
            return self.base_id
        return ids[0] if len(ids) == 1 else Select.NULL

    def on_mount(self) -> None:
        self.query_one("#gpu-count-row").display = False
        self.query_one("#estimate").display = False
        if self.initial_dataset:
            self.check_dataset()

    def on_gpu_select_loaded(self, event: GpuSelect.Loaded) -> None:
        from engine.gpus import has_bitsandbytes

        self._local_qlora = bool(event.gpus) and has_bitsandbytes()
        self._offer_methods()

    def on_target_select_changed(self, event: TargetSelect.Changed) -> None:
        counted = self.query_one(TargetSelect).kind.GPUS == "count"  # a pod's or a batch job's, not this machine's
        self.query_one("#gpu-count-row").display = counted
        self.query_one("#gpus-row").display = not counted
        self._offer_methods()
        self._show_problems(self._hyperparameters()[1])
        self._show_estimate()

    def _offer_methods(self) -> None:
        """QLoRA where it can run: a GPU here with bitsandbytes, or another target (its run checks)."""
        method = self.query_one("#method", Select)
        qlora = self._local_qlora or bool(self._target())
        kept = method.value if qlora or method.value != "qlora" else "lora"
        method.set_options([("LoRA", "lora")] + ([("QLoRA (4-bit base)", "qlora")] if qlora else []))
        method.value = kept

    # -- reading what was typed ---------------------------------------------------------------------

    def _value(self, widget_id: str) -> str:
        return self.query_one(f"#{widget_id}", Input).value.strip()

    def _target(self) -> str:
        return self.query_one(TargetSelect).value

    def _gpus(self) -> str:
        """As the plan takes them: GPUs of this machine, or how many a cluster's pod gets."""
        if self._target():
            return self._value("gpu_count") or "auto"
        return str(self.query_one("#gpus", Select).value)

    def _base(self):
        value = self.query_one("#base", Select).value
        return self.app.store.models.get(value) if isinstance(value, int) else None

    def _base_name(self) -> str | None:
        """What the plan names the base by: a custom model's name, or a Hub repo id."""
        value = self.query_one("#base", Select).value
        if isinstance(value, str):
            return value
        base = self._base()
        return base.model.name if base else None

    def _hyperparameters(self) -> tuple[Hyperparameters, dict[str, str]]:
        values = {f.name: self._value(f.name) for f in Hyperparameters.fields() if f.name != "method"}
        values["method"] = str(self.query_one("#method", Select).value)
        hp, errors = Hyperparameters.from_strings(values)
        if not errors:  # the model's own limits are checked when the run is planned
            if self._target():  # a count; bitsandbytes is the image's to have
                errors = hp.problems(None, "cpu" if self._gpus() in ("0", "cpu") else "0", bitsandbytes=True)
            else:
                errors = hp.problems(None, self._gpus())
        return hp, errors

    def _show_summary(self) -> None:
        """The dataset line: rows, format, the split and the steps the current settings make."""
        if self._rows is None or self._rows[0] != self._value("dataset"):
            return
        from engine.datasets import validation_count  # light: plain Python

        _, rows, format_name = self._rows
        hp, errors = self._hyperparameters()
        val = validation_count(rows, hp.val_split) if "val_split" not in errors else 0
        steps = f", {hp.steps(rows - val):,} steps" if not errors else ""
        self.query_one("#dataset-summary", Static).update(Text.assemble(
            ("✓ ", "bold green"), f"{rows:,} rows, {format_name}: {rows - val:,} train, "
                                 f"{val:,} validation{steps}"))
        self._show_estimate()

    def _on_cpu(self) -> bool:
        if self._target():
            return self._value("gpu_count") == "0"
        gpus, chosen = self.query_one(GpuSelect).gpus, self._gpus()
        return chosen == "cpu" or (chosen == "auto" and gpus == [])

    def _show_estimate(self) -> None:
        line = self.query_one("#estimate", Static)
        base, counted = self._base(), self._counted
        hp, errors = self._hyperparameters()
        if (base is None or counted is None or self._rows is None or errors
                or counted[:2] != (self._value("dataset"), base.model.id) or counted[0] != self._rows[0]):
            line.display = False
            return
        from engine.datasets import validation_count

        rows = self._rows[1]
        val = validation_count(rows, hp.val_split)
        self._estimate(base.model.id, hp, rows - val, bool(val), *counted[2:], self._on_cpu(), self._target())

    @work(thread=True, exclusive=True, group="estimate", exit_on_error=False)
    def _estimate(self, base_id: int, hp: Hyperparameters, train_rows: int, validation: bool, counted,
                  params: int | None, on_cpu: bool, target: str) -> None:
        from engine import estimates

        seen = estimates.rows_seen(hp.steps(train_rows), hp.batch_size, hp.grad_accum, train_rows, hp.epochs,
                                   hp.max_steps)
        key = (base_id, on_cpu, target)  # asked once a dialog: the estimate follows every keystroke
        if key not in self._speeds:
            self._speeds[key] = estimates.measured_speed(self.app.db, base_id, on_cpu, target)
        measured = self._speeds[key]
        guess_cpu = counted.cpu_flops if on_cpu and not target else None
        found = estimates.estimate(seen * counted.stats.mean_trained, measured, params, guess_cpu, validation)
        if found is None:
            text = Text("No time estimate yet: the first run on this device measures its speed", style="dim")
        else:
            long = found.seconds > LONG_RUN_S
            text = Text.assemble(("⏱ ", "bold"), (found.describe(), "bold yellow" if long else ""))
            if long:
                text.append("; fewer max steps or a shorter max length shorten it", style="yellow")
        worker = get_current_worker()
        self.app.call_from_thread(lambda: worker.is_cancelled or self._shown_estimate(text))

    def _shown_estimate(self, text: Text) -> None:
        line = self.query_one("#estimate", Static)
        line.update(text)
        line.display = True

    def _show_problems(self, errors: dict[str, str]) -> None:
        for f in Hyperparameters.fields():
            if f.name != "method":
                self.query_one(f"#{f.name}", Input).set_class(f.name in errors, "-invalid")
        self.query_one("#error", Static).update(Text("; ".join(errors.values())))

    # -- live checks --------------------------------------------------------------------------------

    @on(Input.Changed)
    def input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "dataset":
            self._show_problems(self._hyperparameters()[1])  # a refusal of the dataset before no longer holds
            self._schedule_check()
        elif event.input.id != "name":
            self._show_problems(self._hyperparameters()[1])
            self._show_summary()
        if event.input.id == "max_length":  # the token counts depend on it: count again
            self._schedule_check()

    @on(Select.Changed)
    def select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "base":
            self._schedule_check()
            serve_on = self.query_one("#serve_on", Select)
            kept = serve_on.value
            options = self._serve_on_options(event.value)
            serve_on.set_options(options)
            serve_on.value = kept if any(value == kept for _, value in options) else ""
        self._show_problems(self._hyperparameters()[1])
        self._show_estimate()  # the device (and the base) it rests on

    def _schedule_check(self) -> None:
        if self._check_timer is not None:
            self._check_timer.stop()
        self._check_timer = self.set_timer(CHECK_DELAY_S, self.check_dataset)

    def check_dataset(self) -> None:
        path = self._value("dataset")
        summary = self.query_one("#dataset-summary", Static)
        self.query_one("#token-summary", Static).update("")
        self.query_one("#estimate", Static).display = False
        self.workers.cancel_group(self, "estimate")  # one on its way rests on the dataset before
        if not path:
            summary.update("JSONL: OpenAI chat, ShareGPT, Alpaca or text (detected)")
            return
        summary.update("Reading the dataset…")
        self._rows = None
        base = self._base()
        self._read_dataset(path, base.model.id if base else None, self._hyperparameters()[0])

    @work(thread=True, exclusive=True, group="dataset", exit_on_error=False)
    def _read_dataset(self, path: str, base_id: int | None, hp: Hyperparameters) -> None:
        from catalog.schema import Model
        from engine.datasets import read_dataset, token_stats_in_subprocess
        from engine.estimates import model_params
        from engine.finetune import default_name, model_limits
        from engine.localmodel import model_config

        worker = get_current_worker()

        def show(widget: Static, text: Text | str) -> None:  # only while this is still the dataset asked about
            if not worker.is_cancelled and self._value("dataset") == path:
                widget.update(text)

        summary, tokens = self.query_one("#dataset-summary", Static), self.query_one("#token-summary", Static)
        try:
            dataset = read_dataset(path)
        except EngineError as exc:
            self.app.call_from_thread(show, summary, Text.assemble(("✗ ", "bold red"), str(exc)))
            return
        self._rows = (path, len(dataset.examples), dataset.format_name)
        self.app.call_from_thread(setattr, self.app, "dataset_folder", str(Path(path).expanduser().parent))
        self.app.call_from_thread(self._show_summary)
        with self.app.db.read() as session:
            base = session.get(Model, base_id) if base_id is not None else None
            if base is not None:
                name = default_name(session, base, dataset.path)
                self.app.call_from_thread(setattr, self.query_one("#name", Input), "placeholder", name)
        if base is None or base.state != ModelState.READY:
            self.app.call_from_thread(show, tokens, "Token counts once the base model is Ready.")
            return
        if not Path(base.path).is_dir():
            self.app.call_from_thread(show, tokens, Text(f"No token counts: the base model's folder {base.path} is "
                                                         "missing", style="red"))
            return
        self.app.call_from_thread(show, tokens, "Counting tokens with the base model's tokenizer…")
        max_length = hp.resolved(model_limits(base.path).max_length).max_length
        try:
            counted = token_stats_in_subprocess(base.path, path, max_length, cpu_speed=True)
        except EngineError as exc:  # the first line says it
            self.app.call_from_thread(show, tokens, Text("No token counts: " + str(exc).splitlines()[0], style="red"))
            return
        self.app.call_from_thread(show, tokens, Text(counted.summary))
        if not worker.is_cancelled:
            params = model_params(model_config(base.path)[1])
            self.app.call_from_thread(self._counted_for, path, base.id, counted, params)

    def _counted_for(self, path: str, base_id: int, counted, params: int | None) -> None:
        self._counted = (path, base_id, counted, params)
        self._show_estimate()

    # -- starting -----------------------------------------------------------------------------------

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_start()

    def action_browse(self) -> None:
        # What is typed, else the folder of the dataset used last in this session, else here
        current = Path(self._value("dataset") or self.app.dataset_folder or ".").expanduser()

        def picked(path: Path | None) -> None:
            if path is not None:
                self.app.dataset_folder = str(path.parent)
                self.query_one("#dataset", Input).value = str(path)
                self.query_one("#name", Input).focus()

        self.app.push_screen(FilePicker(current if current.is_dir() else current.parent), picked)

    def action_start(self) -> None:
        if self._starting:  # enter and ctrl+s also reach here while a start is under way
            return
        error = self.query_one("#error", Static)
        base, dataset = self._base_name(), self._value("dataset")
        if base is None:
            error.update("Choose a base model (a Ready base or merged model).")
            self.query_one("#base", Select).focus()
            return
        if not dataset:
            error.update("Name a dataset file (ctrl+o browses).")
            self.query_one("#dataset", Input).focus()
            return
        hp, errors = self._hyperparameters()
        if errors:
            self._show_problems(errors)
            return
        error.update("Checking and starting…")
        self._starting = True
        self.query_one("#start", Button).disabled = True
        self._start(base, dataset, hp, self._gpus(), self._value("name") or None, self._target(),
                    self.query_one(TargetSelect).options, str(self.query_one("#serve_on", Select).value) or None)

    @work(thread=True, exclusive=True, group="start", exit_on_error=False)
    def _start(self, base: str, dataset: str, hp: Hyperparameters, gpus: str, name: str | None, target: str,
               options: dict[str, str], serve_on: str | None) -> None:
        from engine import finetune

        try:
            plan = finetune.plan(self.app.db, base, dataset, hp, gpus, target=target or None, options=options)
            model, _job = finetune.start(self.app.db, plan, name, serve_on)
        except EngineError as exc:
            self.app.call_from_thread(self._refused, str(exc))
            return
        self.app.call_from_thread(self.dismiss, model.id)

    def _refused(self, reason: str) -> None:
        self.query_one("#error", Static).update(Text(reason))
        self._starting = False
        self.query_one("#start", Button).disabled = False
