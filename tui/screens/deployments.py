"""Active deployments: every deployed model with its live state; filter by text (`/`) and by state
(`s`); details (`d` or `enter`), the server's log (`l`), stop (`x`) and delete (`ctrl+d`), both asked first."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding

from catalog.states import DeploymentState
from engine.backends import FIELD_LABELS
from engine.format import (
    backend_label,
    deployment_state_text,
    human_duration,
    human_time,
    listening_on,
    masked_key,
)
from engine.targets import option_label
from tui import dialogs
from tui.screens.base import DeckScreen
from tui.widgets.filter_bar import FilterBar
from tui.widgets.info import InfoLine
from tui.widgets.live_table import Column, LiveTable
from tui.widgets.sparkline import sparkline

if TYPE_CHECKING:
    from catalog.schema import Deployment

EMPTY = ("No deployments yet. A deployment serves a model through an OpenAI-compatible endpoint (vLLM on a "
         "GPU, else the built-in server); each one is listed here with its live state, endpoint and load. "
         "Deploy with p on a model in Community (1) or Custom (2), or `modeldeck deploy MODEL` from the shell.")
STATE_STYLES = {DeploymentState.PENDING: "yellow", DeploymentState.READY: "bold green",
                DeploymentState.FAILED: "bold red", DeploymentState.STOPPED: "dim"}
STATE_FILTERS = (None, *DeploymentState)
clock = time.time  # the snapshot tests set a fixed one
SPARK_CELLS = 4  # the Tok/s column's history: the last 8 s


def listening_text(dep: Deployment) -> str:
    if dep.backend == "external":
        return "not run by modeldeck"
    bound, exposed = listening_on(dep)
    return f"{bound}: reachable from other machines (the API key is required)" if exposed else f"{bound} (this machine only)"


class DeploymentsScreen(DeckScreen):
    TAB_TITLE = "Active deployments"
    MODE = "deployments"
    BINDINGS = [
        Binding("slash", "focus_filter", "Filter", id="deployments.filter", tooltip="Filter by model, backend or endpoint"),
        Binding("s", "cycle_state", "State filter", id="deployments.state", tooltip="Show all, or only pending / ready / failed / stopped"),
        Binding("enter", "connect", "Connect", id="deployments.connect", tooltip="Base URL, key and ready-to-paste snippets"),
        Binding("c", "chat", "Chat", id="deployments.chat", tooltip="Chat with the deployed model"),
        Binding("d", "details", "Details", id="deployments.details", tooltip="Everything about the deployment"),
        Binding("a", "add_endpoint", "Add endpoint", id="deployments.add", show=False,
                tooltip="List an external OpenAI-compatible endpoint, to chat with it"),
        Binding("l", "logs", "Logs", id="deployments.logs", tooltip="The server's log, following it"),
        Binding("x", "stop", "Stop", id="deployments.stop", tooltip="Stop the server (asks first); frees its port and GPUs"),
        Binding("r", "restart", "Start again", id="deployments.restart", show=False,
                tooltip="Start a stopped or failed deployment again: its settings, name and API key"),
        Binding("u", "unload_adapter", "Unload adapter", id="deployments.unload_adapter", show=False,
                tooltip="Stop serving one of its adapters (requests using it finish; new ones get a 404)"),
        Binding("m", "compare", "Compare", id="deployments.compare", show=False,
                tooltip="The same prompts to 2 to 4 models at once (its adapters, other deployments), side by side"),
        Binding("ctrl+d", "delete", "Delete", id="deployments.delete", tooltip="Delete a stopped or failed deployment (asks first)"),
    ]
    COLUMNS = [
        Column("Deployment", ratio=3, min_width=10, cut_middle=True), Column("Backend", width=8), Column("Endpoint", ratio=3, min_width=15),
        Column("State", ratio=4, min_width=12), Column("Requests", width=8), Column("Tok/s", width=10),
        Column("Up", width=6),
    ]
    TICK_S = 2.0  # the uptimes move on

    def __init__(self) -> None:
        super().__init__()
        self.state_filter: DeploymentState | None = None

    def on_mount(self) -> None:  # DeckScreen's on_mount runs too (Textual calls each class's handler)
        self.set_interval(self.TICK_S, self.tick)

    def tick(self) -> None:
        for dep in self.store.deployments.values():
            if dep.state.is_live():
                self.table.upsert(dep.id, self._cells(dep))

    def load_changed(self, deployment_ids: set[int]) -> None:
        for dep_id in deployment_ids:
            if dep_id in self.store.deployments:
                self.table.upsert(dep_id, self._cells(self.store.deployments[dep_id]))

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield FilterBar("/ filter by model, backend or endpoint", id="filter")
        yield InfoLine(id="state-line", classes="subtle-line")
        yield LiveTable(self.COLUMNS, empty_text="Loading…", id="table")
        yield from self.compose_footer()

    def reload(self) -> None:
        self.table.empty_text = EMPTY
        self.table.set_rows((d.id, self._cells(d)) for d in self.store.deployments.values())
        self.apply_filter()
        self.honour_focus_request()
        self.follow_row()

    def deployments_changed(self, changed: set[int], gone: set[int]) -> None:
        for dep_id in gone:
            self.table.remove(dep_id)
        for dep_id in changed:
            self.table.upsert(dep_id, self._cells(self.store.deployments[dep_id]))
        self.apply_filter()  # the state filter and the counts follow the new states
        self.honour_focus_request()
        self.follow_row()

    def _cells(self, dep: Deployment) -> tuple:
        state = deployment_state_text(dep.state, dep.phase, dep.reason, dep.ends_at, clock())
        history = self.store.load.get(dep.id) if dep.state == DeploymentState.READY else None
        requests = f"{history.last.requests:,}" if history else "—"
        rate = Text("—")
        if history and history.points:  # tokens/s now, after the last readings' line
            rate = sparkline(history.series("tokens_per_s"), SPARK_CELLS).append(
                f" {history.points[-1].tokens_per_s:,.0f}")
        if dep.backend == "external":
            address = Text((dep.endpoint or "—").removeprefix("http://").removeprefix("https://"))
        else:  # where it listens; an address open to other machines stands out
            bound, exposed = listening_on(dep)
            address = Text(bound, style="bold yellow" if exposed else "")
        name = Text(dep.name)
        if beside := self.store.adapters_beside(dep):  # how many adapters it serves beside its base
            name.append(f" +{len(beside)}", style="cyan")
        return (name, backend_label(dep.backend), address, Text(state, style=STATE_STYLES[dep.state]),
                requests, rate, self._uptime(dep))

    def _adapters_text(self, dep: Deployment) -> str:
        """What it serves beside its base: each adapter by the name requests give, and the custom model it is."""
        beside = self.store.adapters_beside(dep)
        if not beside:
            return "none (a Ready adapter of its base joins it from Custom: s)"
        names = []
        for name, model_id in beside:
            model = self.store.models.get(model_id) if model_id is not None else None
            names.append(name if model is not None and model.model.name == name else
                         f"{name} ({model.model.name if model else 'deleted'})")
        return ", ".join(names) + " (u unloads one)"

    @staticmethod
    def _uptime(dep: Deployment) -> str:
        """Ready: since it turned Ready (its last change); Pending: since it was made; else nothing."""
        if dep.state == DeploymentState.READY:
            return human_duration(clock() - dep.updated_at)
        return human_duration(clock() - dep.created_at) if dep.state == DeploymentState.PENDING else "—"

    def apply_filter(self) -> None:
        words = self.filter_words
        wanted, deployments = self.state_filter, self.store.deployments

        def keep(dep_id: int) -> bool:
            d = deployments[dep_id]
            served = " ".join(name for name, _ in self.store.adapters.get(dep_id, []))
            text = f"{d.name} {d.backend} {d.endpoint or ''} {d.served_name or ''} {served}".lower()
            return (wanted is None or d.state == wanted) and all(w in text for w in words)

        self.table.set_filter(keep if words or wanted else None)
        self.table.empty_text = EMPTY if not deployments else "No deployment matches: s shows every state; / changes the text."
        label = wanted.value if wanted else "all"
        self.query_one("#state-line", InfoLine).update(
            f" State: {label}  ·  {len(self.table.visible_keys)} of {self.table.row_count} deployments  ·  s state  / filter  ? keys")

    def action_cycle_state(self) -> None:
        index = STATE_FILTERS.index(self.state_filter)
        self.state_filter = STATE_FILTERS[(index + 1) % len(STATE_FILTERS)]
        self.apply_filter()

    def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        self.action_connect()

    def action_connect(self) -> None:
        dep = self._selected()
        if dep is None:
            return
        if dep.state == DeploymentState.READY:
            self.app.open_connect(dep.id)
        else:
            self.action_details()  # not reachable now: what it is doing, or why it failed

    def action_chat(self) -> None:
        dep = self._selected()
        if dep is not None:
            self.app.open_chat(dep.id)

    def action_add_endpoint(self) -> None:
        from tui.screens.endpoint_dialog import EndpointDialog

        def added(dep_id: int | None) -> None:
            if dep_id is not None:
                self.focus_row(dep_id)
                self.notify("Endpoint added: enter for Connect, c to chat", timeout=4)

        self.app.push_screen(EndpointDialog(), added)

    def row_actions(self) -> list[str] | None:
        dep = self._selected()
        if dep is None:
            return ["focus_filter", "cycle_state", "add_endpoint"]
        actions = ["connect", "chat"] if dep.state == DeploymentState.READY else []
        actions.append("details")
        if dep.backend != "external":
            actions.append("logs")
            actions.append("stop" if dep.state.is_live() else "restart")
        if self.store.adapters_beside(dep):
            actions.append("unload_adapter")
        if dep.state == DeploymentState.READY:
            actions.append("compare")
        if not dep.state.is_live() or dep.backend == "external":
            actions.append("delete")
        return actions

    def _selected(self) -> Deployment | None:
        key = self.table.cursor_key
        return self.store.deployments.get(key) if key is not None else None

    def action_logs(self) -> None:
        if (dep := self._selected()) is not None:
            self.open_logs(dep.name, dep.job_id)

    @work(thread=True, exit_on_error=False, group="engine")
    def open_logs(self, name: str, job_id: int | None) -> None:
        from engine import jobs

        job = jobs.get(self.db, job_id) if job_id else None
        if job is None or not job.log_path:
            self.app.call_from_thread(self.notify, f"{name} has no server log", severity="warning", timeout=4)
            return
        self.app.call_from_thread(self.app.push_screen, dialogs.LogDialog(f"{name}: server log (job {job.id})", job.log_path))

    def action_stop(self) -> None:
        dep = self._selected()
        if dep is None:
            return
        if dep.backend == "external":
            self.notify(f"{dep.name} is an external endpoint: modeldeck does not run it; ctrl+d removes it from "
                        "the list", severity="warning", timeout=5)
            return
        if not dep.state.is_live():
            self.notify(f"{dep.name} is {dep.state.value}; nothing to stop", severity="warning", timeout=4)
            return
        freed = "the port and GPUs are" if dep.gpus not in (None, "", "cpu", "0") else "its port is"
        question = dialogs.ConfirmDialog(f"Stop {dep.name}?", f"Clients of {dep.endpoint} lose it; {freed} freed. The "
                                         "deployment stays listed as stopped.", confirm_label="Stop")
        self.app.push_screen(question, lambda yes: yes and self.stop(dep.id, dep.name))

    @work(thread=True, exit_on_error=False, group="engine")
    def stop(self, dep_id: int, name: str) -> None:
        from engine import deployments

        deployments.stop(self.db, dep_id)
        self.app.call_from_thread(self.notify, f"Stopped {name}", timeout=4)

    def action_restart(self) -> None:
        dep = self._selected()
        if dep is None:
            return
        if dep.backend == "external" or dep.state.is_live():
            what = "an external endpoint: modeldeck does not run it" if dep.backend == "external" else dep.state.value
            self.notify(f"{dep.name} is {what}; nothing to start", severity="warning", timeout=4)
            return
        self.restart(dep.id, dep.name)

    @work(thread=True, exit_on_error=False, group="engine")
    def restart(self, dep_id: int, name: str) -> None:
        from engine import deployments

        checked = deployments.replan(self.db, dep_id)
        deployment, _job = deployments.start(self.db, checked)
        for note in checked.notes:
            self.app.call_from_thread(self.notify, note, title=name, severity="warning", timeout=6)
        self.app.call_from_thread(self.notify, f"Starting {name} again at {deployment.endpoint or checked.serving.summary}",
                                  timeout=4)
        self.app.call_from_thread(self.focus_row, deployment.id)

    def action_delete(self) -> None:
        dep = self._selected()
        if dep is None:
            return
        external = dep.backend == "external"
        if dep.state.is_live() and not external:
            self.notify(f"{dep.name} is {dep.state.value}: stop it first (x)", severity="warning", timeout=4)
            return
        what = ("It leaves the list with its conversations (and its key, if the keyring holds it); the server "
                "itself is not touched." if external else
                "Its record, settings and chat conversations go; its model stays.")
        question = dialogs.ConfirmDialog(f"Delete {dep.name}?", f"{what} This cannot be undone.")
        self.app.push_screen(question, lambda yes: yes and self.delete(dep.id))

    @work(thread=True, exit_on_error=False, group="engine")
    def delete(self, dep_id: int) -> None:
        from engine import deployments

        name = self.store.deployments[dep_id].name if dep_id in self.store.deployments else "it"
        deployments.delete(self.db, dep_id)
        self.app.call_from_thread(self.notify, f"Deleted {name}", timeout=3)

    def compare_choices(self) -> list[tuple[str, str]]:
        """Every model that can be asked now, as compare names it: each Ready deployment's own, its base where it
        was deployed as an adapter, its adapters; each external endpoint."""
        from engine.backends import base_served_name

        choices = []
        for dep in sorted(self.store.deployments.values(), key=lambda d: d.name):
            if dep.backend == "external":
                choices.append((dep.name, f"{dep.name}  (external: {dep.served_name or 'its model'})"))
                continue
            if dep.state != DeploymentState.READY:
                continue
            choices.append((dep.name, f"{dep.name}  ({dep.served_name})"))
            row = self.store.models.get(dep.model_id) if dep.model_id is not None else None
            if row is not None and (base := base_served_name(dep.served_name or "", row.model)) != dep.served_name:
                choices.append((f"{dep.name}:{base}", f"{dep.name}:{base}  (its base)"))
            for name, _ in self.store.adapters_beside(dep):
                choices.append((f"{dep.name}:{name}", f"{dep.name}:{name}  (an adapter beside its base)"))
        return choices

    def action_compare(self) -> None:
        from tui.screens.compare import ComparePicker

        dep = self._selected()
        choices = self.compare_choices()
        if len(choices) < 2:
            self.notify("Comparing needs two models: a Ready deployment serving an adapter beside its base, two "
                        "deployments, or an external endpoint (a)", severity="warning", timeout=6)
            return
        mine = [name for name, _ in choices if dep is not None and (name == dep.name or name.startswith(f"{dep.name}:"))]

        def chosen(names: list[str] | None) -> None:
            if names:
                self.app.open_compare(names)

        self.app.push_screen(ComparePicker(choices, mine[:4]), chosen)

    def action_unload_adapter(self) -> None:
        dep = self._selected()
        if dep is None:
            return
        beside = self.store.adapters_beside(dep)
        if not beside:
            self.notify(f"{dep.name} serves no adapter beside its base; one joins it from Custom (s on a Ready "
                        "adapter of its base)", severity="warning", timeout=5)
            return
        actions = [(f"unserve({i})", f"{name}  (requests using it finish; new ones get a 404)"
                    if dep.state == DeploymentState.READY else f"{name}  (not loaded when it starts again)")
                   for i, (name, _) in enumerate(beside)]

        def chosen(action: str | None) -> None:
            if action:
                self.unserve(dep.id, beside[int(action[len("unserve("):-1])][0])

        self.app.push_screen(dialogs.ActionMenu(f"Unload an adapter from {dep.name}", actions, wide=True), chosen)

    @work(thread=True, exit_on_error=False, group="engine")
    def unserve(self, dep_id: int, served_name: str) -> None:
        from engine.deployment_adapters import unserve_adapter

        gone = unserve_adapter(self.db, served_name, dep_id)
        name = self.store.deployments[dep_id].name if dep_id in self.store.deployments else "the deployment"
        self.app.call_from_thread(self.notify, f"{name} no longer serves {gone.served_name}", timeout=4)

    def action_details(self) -> None:
        dep = self._selected()
        if dep is not None:
            self.open_details(dep.id, dep.job_id)

    @work(thread=True, exit_on_error=False, group="engine")
    def open_details(self, dep_id: int, job_id: int | None) -> None:
        from engine import jobs

        job = jobs.get(self.db, job_id) if job_id else None
        self.app.call_from_thread(self._show_details, dep_id, job.log_path if job else None)

    def _show_details(self, dep_id: int, log_path: str | None) -> None:
        dep = self.store.deployments.get(dep_id)
        if dep is None:
            return  # deleted meanwhile
        seen = {"dep": dep}

        def live():
            seen["dep"] = self.store.deployments.get(dep_id, seen["dep"])
            return self.details_fields(seen["dep"]), log_path

        self.app.push_screen(dialogs.DeploymentDetails(dep.name, live, lambda: self.store.load.get(dep_id),
                                                       copy_value=dep.endpoint))

    def details_fields(self, dep: Deployment) -> list[tuple[str, str | Text]]:
        from engine import targets

        row = self.store.models.get(dep.model_id)
        base = self.store.models.get(row.model.base_id) if row and row.model.base_id else None
        adapter_base = base.model if base and row.model.kind.value == "adapter" else None
        served = [(name, self.store.models[model_id].model) for name, model_id in self.store.adapters.get(dep.id, [])
                  if model_id in self.store.models]
        command = targets.of_deployment(dep).serving_command(dep, row.model if row else None, adapter_base, served)
        history = self.store.load.get(dep.id) if dep.state == DeploymentState.READY else None
        load = history.last if history else None
        fields = [
            ("Model", row.model.name if row else "—"), ("Backend", f"{backend_label(dep.backend)} ({dep.backend})"),
            ("State", Text(deployment_state_text(dep.state, dep.phase, dep.reason, dep.ends_at, clock()),
                           style=STATE_STYLES[dep.state])),
            ("Endpoint", dep.endpoint or "—"), ("Served name", dep.served_name or "—"),
            ("Adapters", self._adapters_text(dep)),
            ("API key", masked_key(dep.api_key)), ("GPUs", dep.gpus or "—"),
            ("Created", f"{human_time(dep.created_at)} ({human_duration(clock() - dep.created_at)} ago)"),
            ("Up", self._uptime(dep)),
            ("Listening on", listening_text(dep)),
            ("Requests", f"{load.requests:,} answered (the warm-up included), {load.tokens:,} "
                         f"token{'' if load.tokens == 1 else 's'} generated" if load else "—"),
            ("Command", command),
        ]
        settings = dep.loads(dep.settings_json, {})
        if dep.backend == "external":  # no settings of ours: only where its key is kept
            where = f"from ${settings['key_env']}" if settings.get("key_env") else (
                "in the system keyring" if settings.get("key_keyring") else "none")
            return [(k, v) for k, v in fields if k not in ("Model", "GPUs", "Command", "Adapters")] + [
            ("API key kept", where)]
        import dataclasses

        from engine.backends import DeploySettings

        settings = dataclasses.asdict(DeploySettings.of(dep))
        shown = {"backend", "gpus", "served_name", "options"}  # above, as resolved; the target's options below
        fields += [(FIELD_LABELS.get(k, k), str(v) if v not in ("", 0) else "default")
                   for k, v in settings.items() if k not in shown]
        fields += [(option_label(k), str(v)) for k, v in settings.get("options", {}).items() if v not in ("", None)]
        return fields
