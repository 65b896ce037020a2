"""Custom: downloaded, imported, merged models and adapters, with live state. `enter` opens the action
menu; delete is confirmed and refused while something depends on the model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding

from catalog.states import DeploymentState, JobKind, ModelKind, ModelState
from engine.format import (
    delete_consequence,
    human_bytes,
    human_duration,
    human_time,
    job_progress,
    meta_label,
    meta_value,
    model_location,
)
from engine.hub import model_link
from tui import dialogs
from tui.screens.base import DeckScreen
from tui.widgets.filter_bar import FilterBar
from tui.widgets.info import InfoLine
from tui.widgets.live_table import Column, LiveTable
from tui.widgets.status import model_status

if TYPE_CHECKING:
    from engine.models import ModelRow

ASK_BEFORE_CANCELLING_S = 60  # a job that has run longer holds work worth a question before it goes
EMPTY = ("No custom models yet. Download one from Community (1, then enter), "
         "or import a local folder or GGUF file with i.")


class CustomScreen(DeckScreen):
    TAB_TITLE = "Custom"
    MODE = "custom"
    BINDINGS = [
        Binding("slash", "focus_filter", "Filter", id="custom.filter", tooltip="Filter by name, kind, state or source"),
        Binding("enter", "menu", "Actions", id="custom.menu", tooltip="Action menu of the selected model"),
        Binding("f", "finetune", "Fine-tune", id="custom.finetune", tooltip="Fine-tune a model with LoRA on your dataset"),
        Binding("d", "details", "Details", id="custom.details", tooltip="Everything known about the model, lineage included"),
        Binding("p", "deploy", "Deploy", id="custom.deploy", tooltip="Serve the model through an OpenAI-compatible endpoint"),
        Binding("c", "connect", "Connect", id="custom.connect", show=False, tooltip="Go to the model's deployment"),
        Binding("i", "import_model", "Import", id="custom.import", tooltip="Import a local model folder or GGUF file"),
        Binding("m", "merge", "Merge", id="custom.merge", show=False,
                tooltip="Merge the selected adapter into its base: a model of its own"),
        Binding("s", "serve_on", "Serve on…", id="custom.serve_on", show=False,
                tooltip="Load the adapter onto a running deployment of its base, without a restart (or unload it)"),
        Binding("e", "evaluate", "Evaluate", id="custom.evaluate", show=False,
                tooltip="Loss and perplexity on a dataset (an adapter: beside its base); the result joins its details"),
        Binding("r", "retry", "Retry", id="custom.retry", show=False,
                tooltip="Retry a failed download, conversion, fine-tune (resuming) or merge"),
        Binding("x", "cancel_job", "Cancel job", id="custom.cancel", tooltip="Cancel the running download, conversion, fine-tune or merge"),
        Binding("ctrl+d", "delete", "Delete", id="custom.delete", tooltip="Delete the model and free its disk (asks first)"),
        Binding("l", "logs", "Logs", id="custom.logs", tooltip="The log of the model's latest job, following it"),
        Binding("y", "copy_path", "Copy path", id="custom.copy_path", show=False, tooltip="Copy the model's folder path"),
    ]
    COLUMNS = [
        Column("Name", ratio=3, min_width=12, cut_middle=True), Column("Kind", width=7), Column("State", ratio=5, min_width=12),
        Column("Size", width=8), Column("Source", ratio=1, min_width=8), Column("Base", ratio=2, min_width=6),
        Column("Created", width=10),
    ]

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield FilterBar("/ filter by name, kind, state or source", id="filter")
        yield LiveTable(self.COLUMNS, empty_text="Loading…", id="table")
        yield InfoLine(id="preview", classes="preview")
        yield from self.compose_footer()

    # -- data ---------------------------------------------------------------------------------------

    def reload(self) -> None:
        self.table.empty_text = EMPTY
        self.table.set_rows((model_id, self._cells(row)) for model_id, row in self.store.models.items())
        self.apply_filter()
        self.honour_focus_request()
        self.follow_row()

    def models_changed(self, changed: set[int], gone: set[int], repos: set[str]) -> None:
        for model_id in gone:
            self.table.remove(model_id)
        for model_id in changed:
            self.table.upsert(model_id, self._cells(self.store.models[model_id]))
        if self.table.cursor_key in changed | gone:
            self._show_preview(self.table.cursor_key)
        self.honour_focus_request()

    def _cells(self, row: ModelRow) -> tuple:
        m = row.model
        return (m.name, m.kind.value, model_status(row, deployed=self.store.is_deployed(m.id)),
                human_bytes(m.size_bytes), m.source,
                row.base_name or "", human_time(m.created_at)[:10])

    def deployments_changed(self, changed: set[int], gone: set[int]) -> None:
        for model_id, row in self.store.models.items():  # a few dozen rows: patch them all
            self.table.upsert(model_id, self._cells(row))
        self._show_preview(self.table.cursor_key)

    # -- filtering and preview ----------------------------------------------------------------------

    def apply_filter(self) -> None:
        words = self.filter_words
        self.table.empty_text = EMPTY if not self.store.models else "No model matches the filter (/ to change it)."
        if not words:
            self.table.set_filter(None)
            return
        store = self.store

        def keep(model_id: int) -> bool:
            m = store.models[model_id].model
            text = f"{m.name} {m.kind.value} {m.state.value} {m.source} {m.reason or ''}".lower()
            return all(word in text for word in words)

        self.table.set_filter(keep)

    def on_live_table_highlighted(self, event: LiveTable.Highlighted) -> None:
        self._show_preview(event.key)

    def _show_preview(self, model_id: int | None) -> None:
        self.follow_row()
        preview = self.preview_line()
        if preview is None:
            return
        row = self.store.models.get(model_id) if model_id is not None else None
        if row is None:
            preview.update("")
            return
        m = row.model
        text = Text.assemble((m.name, "bold"), f"  {m.kind.value} · {human_bytes(m.size_bytes)} · {m.source}\n")
        text.append_text(model_status(row, "long", deployed=self.store.is_deployed(m.id)))
        if row.job and m.state == ModelState.PENDING:
            text.append(f"  (job {row.job.id}: x cancels)", style="dim")
        text.append(f"\n{model_location(m) or 'no files yet'}", style="dim")
        preview.update(text)

    # -- actions ------------------------------------------------------------------------------------

    def _row(self) -> ModelRow | None:
        key = self.table.cursor_key
        return self.store.models.get(key) if key is not None else None

    def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        self.action_menu()

    def _actions(self, row: ModelRow) -> list[tuple[str, str]]:
        """What the row's model can do now, as (action, label): its menu, and the keys its footer shows."""
        from engine.models import (
            retry_label,  # loaded by now; not at import, to keep the first paint fast
        )

        m = row.model
        actions = [("details", "Show details  d")]
        if m.state == ModelState.READY and m.kind != ModelKind.ADAPTER:
            actions.append(("finetune", "Fine-tune  f"))
        if m.state == ModelState.READY and m.kind == ModelKind.ADAPTER:
            actions.append(("merge", "Merge into base  m"))
            if self._deployments_of_base(m):
                actions.append(("serve_on", "Serve on a deployment of its base…  s"))
        if self.store.is_deployed(m.id):
            actions.append(("connect", "Connect (its deployment)  c"))
        if m.state == ModelState.READY:
            actions.append(("deploy", "Deploy  p"))
            if row.job is None and self._files_here(m):
                actions.append(("evaluate", "Evaluate on a dataset…  e"))
        if retried := retry_label(m):
            actions.append(("retry", f"Retry {retried}  r"))
        if row.job is not None:
            actions.append(("cancel_job", f"Cancel {row.job.kind.value}  x"))
        if row.model.job_id is not None:
            actions.append(("logs", "Job log  l"))
        actions.append(("delete", "Delete  ctrl+d"))
        return actions

    def row_actions(self) -> list[str] | None:
        row = self._row()
        if row is None:  # nothing to act on: what starts a model
            return ["focus_filter", "import_model", "finetune"]
        order = ["menu", "cancel_job", "retry", "merge", "connect", "deploy", "finetune", "logs", "details", "delete",
                 "serve_on", "evaluate"]
        return sorted(["menu"] + [action for action, _label in self._actions(row)], key=order.index)

    def action_menu(self) -> None:
        row = self._row()
        if row is None:
            return
        actions = self._actions(row)

        def chosen(action: str | None) -> None:
            if action:
                self.call_next(self.run_action, action)

        self.app.push_screen(dialogs.ActionMenu(row.model.name, actions), chosen)

    def action_logs(self) -> None:
        row = self._row()
        if row is not None:
            self.open_logs(row.model.id, row.model.name)

    @work(thread=True, exit_on_error=False, group="engine")
    def open_logs(self, model_id: int, name: str) -> None:
        from engine import jobs

        job = jobs.latest_for_model(self.db, model_id)
        if job is None or not job.log_path:
            self.app.call_from_thread(self.notify, f"No job has run for {name} (it was imported in place)",
                                      severity="warning", timeout=4)
            return
        title = f"{name}: job {job.id} ({job.kind.value}, {job.state.value})"
        self.app.call_from_thread(self.app.push_screen, dialogs.LogDialog(title, job.log_path))

    def action_copy_path(self) -> None:
        row = self._row()
        self.app.copy_text(row.model.path if row else None, "path")

    def action_details(self) -> None:
        row = self._row()
        if row is None:
            return
        if row.model.kind == ModelKind.ADAPTER and row.model.job_id is not None:
            self.open_training_details(row.model.id)
        else:
            self.app.push_screen(dialogs.DetailsDialog(row.model.name, self.details_fields(row), copy_value=row.model.path))

    @work(thread=True, exit_on_error=False, group="engine")
    def open_training_details(self, model_id: int) -> None:
        """A fine-tuned adapter's details: its facts, loss curve and log, following the job while it runs."""
        from engine import jobs

        job = jobs.latest_for_model(self.db, model_id, JobKind.FINETUNE)  # the run's curve, if it is over
        self.app.call_from_thread(self._show_training_details, model_id, job)

    def _show_training_details(self, model_id: int, job) -> None:
        row = self.store.models.get(model_id)
        if row is None:
            return  # deleted meanwhile
        seen = {"row": row, "job": job}

        def training_job(row):  # (an evaluation of the adapter is a job of it too)
            return row.job if row is not None and row.job is not None and row.job.kind == JobKind.FINETUNE else None

        def live():
            row = self.store.models.get(model_id)
            if row is not None:
                if training_job(row) is None and seen["job"] is not None and not seen["job"].state.is_terminal():
                    self.reread_job(seen, seen["job"].id)  # it ended: its last metrics are in the database
                seen["row"] = row
                if training_job(row) is not None:
                    seen["job"] = row.job
            job = seen["job"]
            curves = job.loads(job.metrics_json, {}).get("curve", {}) if job else {}
            curves = curves | {"evaluation": seen["row"].model.meta.get("evaluation")}  # once it is Ready
            return self.details_fields(seen["row"]), curves, job.log_path if job else None

        def training() -> bool:
            return training_job(self.store.models.get(model_id)) is not None

        self.app.push_screen(dialogs.TrainingDetails(row.model.name, live, copy_value=row.model.path, training=training))

    @work(thread=True, exclusive=True, exit_on_error=False, group="reread")
    def reread_job(self, seen: dict, job_id: int) -> None:
        from engine import jobs

        seen["job"] = jobs.get(self.db, job_id)

    def lineage(self, row: ModelRow) -> list[str]:
        """Names from the first base model to this one: base → adapter → merged."""
        chain, cursor = [], row
        while cursor is not None and len(chain) < 20:
            chain.insert(0, cursor.model.name)
            cursor = self.store.models.get(cursor.model.base_id) if cursor.model.base_id else None
        if cursor is None and chain and row.base_name and chain[0] == row.model.name:
            chain.insert(0, row.base_name)  # the base is not listed (yet)
        return chain

    def details_fields(self, row: ModelRow) -> list[tuple[str, str | Text]]:
        from engine.models import (
            owns_files,  # loaded by now; not at import, to keep the first paint fast
        )

        m = row.model
        children = [r.model.name for r in self.store.models.values() if r.model.base_id == m.id]
        deployments = [d.name for d in self.store.deployments_of(m.id)]
        deployments += [f"{d.name} (beside its base: s)" for d in self.store.serving(m.id)]
        fields: list[tuple[str, str | Text]] = [
            ("Kind", m.kind.value), ("State", model_status(row, "long")), ("Source", m.source),
        ]
        if m.repo_id:  # the link the download recorded (a mirror's, say), else the Hub's
            fields += [("Repo", m.repo_id), ("Link", m.meta.get("link") or model_link(m.repo_id))]
        fields += [
            ("Revision", m.revision or "—"), ("Path", model_location(m) or "—"),
            ("Files owned", "yes: deleting frees them" if owns_files(m) else
             "no: imported in place; deleting leaves the folder"),
            ("Size on disk", human_bytes(m.size_bytes)),
            ("Lineage", " → ".join(self.lineage(row)) if m.base_id else f"{m.name} (a base model)"),
            ("Built on it", ", ".join(children) or "nothing"),
            ("Deployments", ", ".join(deployments) or "none"),
            ("Created", human_time(m.created_at)),
        ]
        if row.job:
            fields.append(("Job", f"{row.job.id} {row.job.kind.value} {row.job.state.value}: {job_progress(row.job, 'long')}"))
            fields.append(("Job log", row.job.log_path or "—"))
        fields += [(meta_label(key), meta_value(key, v)) for key, v in m.meta.items() if key != "link"]  # shown above
        return fields

    def action_import_model(self) -> None:
        def chosen(result: tuple[Path, str | None] | None) -> None:
            if result:
                self.import_model(*result)

        self.app.push_screen(dialogs.ImportDialog(), chosen)

    @work(thread=True, exit_on_error=False, group="engine")
    def import_model(self, path: Path, name: str | None) -> None:
        from engine import models

        model, job = models.import_path(self.db, path, name)
        message = f"Imported {model.name}" if job is None else f"Converting {path.name} into {model.name}…"
        self.app.call_from_thread(self.focus_row, model.id)
        self.app.call_from_thread(self.notify, message, timeout=4)

    def action_finetune(self) -> None:
        row = self._row()
        base_id = None if row is None else (row.model.base_id if row.model.kind == ModelKind.ADAPTER else row.model.id)
        self.app.push_screen(dialogs.FinetuneDialog(base_id), self._started)

    def _started(self, model_id: int | None) -> None:
        if model_id is not None:
            self.focus_row(model_id)
            self.notify("Fine-tune started: its progress shows in its row; d for the loss curve, l for the log",
                        timeout=5)

    def action_deploy(self) -> None:
        row = self._row()
        if row is None:
            return
        if row.model.state != ModelState.READY:
            self.notify(f"{row.model.name} is {row.model.state.value}; deploy it once it is Ready", severity="warning")
            return
        self.app.open_deploy(row.model.id)

    def action_connect(self) -> None:
        row = self._row()
        if row is not None:
            self.app.connect(row.model.id)

    def action_merge(self) -> None:
        row = self._row()
        if row is None:
            return
        if row.model.kind != ModelKind.ADAPTER or row.model.state != ModelState.READY:
            self.notify("Merge works on a Ready adapter (a fine-tune's result)", severity="warning")
            return
        self.merge(row.model.name)

    @staticmethod
    def _files_here(model) -> bool:
        from engine import targets  # loaded by now; not at import, to keep the first paint fast

        return bool(model.path) and targets.home_of(model).files_here(model)

    def action_evaluate(self) -> None:
        row = self._row()
        if row is None:
            return
        m = row.model
        if m.state != ModelState.READY or not self._files_here(m):
            where = "once it is Ready" if m.state != ModelState.READY else "where its files are"
            self.notify(f"{m.name} is evaluated {where}", severity="warning", timeout=5)
            return
        if row.job is not None:
            self.notify(f"{m.name} is being evaluated: its row shows how far (x cancels)", severity="warning",
                        timeout=4)
            return

        def started(job_id: int | None) -> None:
            if job_id is not None:
                self.notify(f"Evaluating {m.name}: its row shows how far; the result joins its details (d)", timeout=5)

        adapter_of = row.base_name if m.kind == ModelKind.ADAPTER else None
        self.app.push_screen(dialogs.EvaluateDialog(m.id, m.name, adapter_of), started)

    def _deployments_of_base(self, adapter) -> list:
        """The live deployments (not external) whose base is this adapter's, other than one of the adapter itself."""
        found = []
        for dep in self.store.deployments.values():
            row = self.store.models.get(dep.model_id) if dep.model_id is not None else None
            if row is None or not dep.state.is_live() or dep.backend == "external" or dep.model_id == adapter.id:
                continue
            base_id = row.model.base_id if row.model.kind == ModelKind.ADAPTER else row.model.id
            if base_id == adapter.base_id:
                found.append(dep)
        return found

    def action_serve_on(self) -> None:
        row = self._row()
        if row is None:
            return
        m = row.model
        if m.kind != ModelKind.ADAPTER or m.state != ModelState.READY:
            self.notify("Serving on a deployment is for a Ready adapter: it joins a running deployment of its base",
                        severity="warning", timeout=5)
            return
        found = self._deployments_of_base(m)
        if not found:
            self.notify(f"No deployment of {row.base_name or 'its base'} is running: deploy it (p on it) and serve "
                        f"{m.name} beside it, or deploy {m.name} itself (p)", severity="warning", timeout=6)
            return
        choices = []
        for dep in found:
            if any(model_id == m.id for _, model_id in self.store.adapters.get(dep.id, [])):
                choices.append((f"unserve:{dep.id}", f"Stop serving it on {dep.name}"))
            elif dep.state == DeploymentState.READY:
                choices.append((f"serve:{dep.id}", f"Serve it on {dep.name}: requests name it {m.name}"))
            else:
                choices.append((f"wait:{dep.id}", f"{dep.name} is starting: serve it there once it is Ready"))

        def chosen(choice: str | None) -> None:
            if not choice or choice.startswith("wait:"):
                return
            what, dep_id = choice.split(":")
            self.serve_or_unserve(m.id, int(dep_id), what == "serve")

        self.app.push_screen(dialogs.ActionMenu(f"{m.name} on a deployment of {row.base_name}", choices, wide=True),
                             chosen)

    @work(thread=True, exit_on_error=False, group="engine")
    def serve_or_unserve(self, adapter_id: int, deployment_id: int, serve: bool) -> None:
        from engine.deployment_adapters import serve_adapter, unserve_adapter

        dep = self.store.deployments.get(deployment_id)
        name = dep.name if dep else "the deployment"
        if serve:
            served = serve_adapter(self.db, adapter_id, deployment_id)
            said = f"{name} serves {served.model.name}: requests name it {served.served_name!r}"
        else:
            adapter = self.store.models.get(adapter_id)
            gone = unserve_adapter(self.db, adapter.model.name if adapter else str(adapter_id), deployment_id)
            said = f"{name} no longer serves {gone.served_name}"
        self.app.call_from_thread(self.notify, said, timeout=5)

    @work(thread=True, exit_on_error=False, group="engine")
    def merge(self, name: str) -> None:
        from engine import finetune

        model, _job = finetune.merge(self.db, name)
        self.app.call_from_thread(self.focus_row, model.id)
        self.app.call_from_thread(self.notify, f"Merging {name} into its base as {model.name}…", timeout=4)

    def action_retry(self) -> None:
        row = self._row()
        if row is None:
            return
        if row.model.state != ModelState.FAILED:
            self.notify(f"{row.model.name} is {row.model.state.value}; only a failed model can be retried", severity="warning")
            return
        self.retry(row.model.name)

    @work(thread=True, exit_on_error=False, group="engine")
    def retry(self, name: str) -> None:
        from engine import models

        models.retry(self.db, name)

    def action_cancel_job(self) -> None:
        row = self._row()
        if row is None or row.job is None:
            if row is not None and self.store.is_deployed(row.model.id):
                self.notify(f"{row.model.name} has no job running; its deployment is stopped in Active deployments "
                            "(3, then x)", severity="warning", timeout=5)
            else:
                self.notify("Nothing is running for this model", severity="warning")
            return
        job, name = row.job, row.model.name
        ran_s = time.time() - (job.started_at or job.created_at)
        if ran_s < ASK_BEFORE_CANCELLING_S:
            self._cancel(job.id, job.kind.value, name)
            return
        done = job_progress(job, "short")
        question = dialogs.ConfirmDialog(f"Cancel the {job.kind.value} of {name}?",
                                         f"It has run {human_duration(ran_s)} ({done}). A retry (r) resumes it from "
                                         "what it kept.", confirm_label="Cancel it", variant="warning")
        self.app.push_screen(question, lambda yes: yes and self._cancel(job.id, job.kind.value, name))

    def _cancel(self, job_id: int, kind: str, name: str) -> None:
        self.notify(f"Cancelling {kind} of {name}…", timeout=3)
        self.cancel_job(job_id)

    @work(thread=True, exit_on_error=False, group="engine")
    def cancel_job(self, job_id: int) -> None:
        from engine import jobs

        jobs.cancel(self.db, job_id)

    def action_delete(self) -> None:
        row = self._row()
        if row is not None:
            self.check_and_confirm_delete(row.model.name)

    @work(thread=True, exit_on_error=False, group="engine")
    def check_and_confirm_delete(self, name: str) -> None:
        from engine import models

        plan = models.delete_plan(self.db, name)
        if plan.blockers:
            self.app.call_from_thread(self.notify, f"Cannot delete {name}: " + "; ".join(plan.blockers),
                                      title="Delete refused", severity="error", timeout=10)
            return
        dialog = dialogs.ConfirmDialog(f"Delete {name}?", f"{delete_consequence(plan)} This cannot be undone.")
        self.app.call_from_thread(self.app.push_screen, dialog, lambda yes: yes and self.delete(name))

    @work(thread=True, exit_on_error=False, group="engine")
    def delete(self, name: str) -> None:
        from engine import models

        freed = models.delete_model(self.db, name)
        self.app.call_from_thread(self.notify, f"Deleted {name} (freed {human_bytes(freed)})", timeout=4)
