"""The modeldeck App: three tab screens (keys 1 2 3), one worker that follows the event log, dialogs.

The UI thread never touches the database: a thread worker opens and reads it after the first paint
(SQLAlchemy is imported there too, so the first frame does not wait for it), then polls the event log
every POLL_S and posts the changed rows as messages; screens patch their tables by key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState, get_current_worker

from catalog.errors import CatalogError
from catalog.states import DeploymentState
from engine.errors import EngineError
from engine.localmodel import has_chat_template
from tui.keys import KeysInOrder
from tui.messages import CommunityChanged, DataLoaded, DeploymentsChanged, ModelsChanged
from tui.screens.base import DeckScreen
from tui.screens.help import HelpDialog
from tui.store import Store

if TYPE_CHECKING:
    from catalog.db import Database
    from engine.events import EventFollower

POLL_S = 0.1
RECONCILE_S = 2.0
LOAD_EVERY_S = 2.0  # how often the Ready servers' /metrics are read (their load history)
GPUS_EVERY_S = 2.0  # how often the GPUs are read (NVML, in a worker)
TAB_MODES = ("community", "custom", "deployments")
# Each tab screen's class, imported when it is first wanted: only Community's is before the first paint.
_TAB_CLASSES = {"community": "tui.screens.community:CommunityScreen", "custom": "tui.screens.custom:CustomScreen",
                "deployments": "tui.screens.deployments:DeploymentsScreen"}


def tab_screen_class(mode: str) -> type[DeckScreen]:
    import importlib

    module, name = _TAB_CLASSES[mode].split(":")
    return getattr(importlib.import_module(module), name)


class ModelDeckApp(KeysInOrder, App):
    TITLE = "modeldeck"
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses (tests, benches) live elsewhere
    SCREENS = {mode: (lambda mode=mode: tab_screen_class(mode)()) for mode in TAB_MODES}
    MODES = {mode: mode for mode in TAB_MODES}
    DEFAULT_MODE = "community"
    # 1 2 3 are on the nav bar, so the footer keeps its room for the screen's own keys.
    BINDINGS = [
        Binding("1", "switch_mode('community')", "Community", id="app.community", tooltip="Curated open models", show=False),
        Binding("2", "switch_mode('custom')", "Custom", id="app.custom", tooltip="Your downloaded and fine-tuned models", show=False),
        Binding("3", "switch_mode('deployments')", "Active deployments", id="app.deployments", tooltip="Active deployments", show=False),
        Binding("4", "gpus", "GPUs", id="app.gpus", show=False,
                tooltip="This machine's GPUs: load, memory, temperature, power and who holds each"),
        Binding("question_mark", "help", "Keys", id="app.help", tooltip="Show the keys of this screen"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(self, db: Database | None = None, follow: bool = True, open_chat: str | None = None,
                 open_compare: list[str] | None = None):
        """`db`: an open database, or None to open the default one after the first paint. `open_chat`: a
        deployment's name (or id) whose chat opens once the data is loaded (`modeldeck chat NAME`);
        `open_compare`: models to compare then (`modeldeck compare A B`)."""
        super().__init__()
        self.db = db
        self.store = Store()
        self._follow = follow
        self._open_chat = open_chat
        self._open_compare = open_compare
        self.dataset_folder: str | None = None  # where the fine-tune dialog's file picker starts (the last used)
        self.keymap: dict[str, str] = {}  # the user's keys by binding id (the config file's [keys])

    def on_mount(self) -> None:
        self.follow_database()
        self.call_after_refresh(self.apply_keymap)  # it reads every screen's keys: after the first paint

    def apply_keymap(self) -> None:
        """The user's own keys ([keys] of the config file: a binding's id = its keys)."""
        from catalog.settings import current

        try:
            keys = current().keys
        except CatalogError:
            return  # the database's opening says what is wrong with the file, and ends the app
        known = {b.id for screen in (self, *map(tab_screen_class, TAB_MODES)) for b in screen.BINDINGS
                 if isinstance(b, Binding) and b.id}
        if unknown := sorted(set(keys) - known):
            self.notify(f"no binding has the id {', '.join(unknown)}; the ids are listed by ? (Keys)",
                        title="Config file [keys]", severity="warning", timeout=10)
        self.keymap = {binding: key for binding, key in keys.items() if binding in known}
        self.set_keymap(self.keymap)

    # -- data ---------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="follow", exit_on_error=False)
    def follow_database(self) -> None:
        """Load everything once, then patch from the event log until the app exits."""
        import engine
        from engine import jobs, models
        from engine.deployment_adapters import adapters_by_deployment
        from engine.deployments import deployment_rows
        from engine.events import EventFollower

        if self.db is None:
            try:
                self.db = engine.start()
            except CatalogError as exc:
                self.call_from_thread(self.exit, return_code=1, message=f"modeldeck: {exc}")
                return
        for notice in self.db.notices:  # said once: what opening it made private
            self.call_from_thread(self.notify, notice, title="Made private", timeout=10)
        try:
            follower = EventFollower(self.db)  # before the load, so no change slips between the two
            self.post_message(DataLoaded(models.community_entries(self.db), models.model_rows(self.db),
                                         deployment_rows(self.db), adapters_by_deployment(self.db)))
        except CatalogError as exc:  # a damaged or unreadable file: nothing to show but why
            self.call_from_thread(self.exit, return_code=1, message=f"modeldeck: {exc}")
            return
        worker = get_current_worker()
        last_reconcile, last_error = 0.0, None
        while self._follow and not worker.is_cancelled:
            try:
                if time.monotonic() - last_reconcile > RECONCILE_S:
                    last_reconcile = time.monotonic()
                    jobs.reconcile(self.db)
                self.apply_changes(follower)
                last_error = None
            except Exception as exc:  # noqa: BLE001 - a bad moment (disk full, locked file) must not end live updates
                if repr(exc) != last_error:
                    last_error = repr(exc)
                    said = str(exc) if isinstance(exc, (CatalogError, EngineError)) else f"{type(exc).__name__}: {exc}"
                    self.call_from_thread(self.notify, said, title="Live updates paused; retrying",
                                          severity="warning", timeout=8)
                time.sleep(1.0)
            time.sleep(POLL_S)

    def apply_changes(self, follower: EventFollower) -> None:
        """Read what the new events touched and post it (worker thread)."""
        from engine import models
        from engine.deployment_adapters import adapters_by_deployment
        from engine.deployments import deployment_rows

        changes = follower.poll()
        if changes.models:
            rows = models.model_rows(self.db, changes.models)
            self.post_message(ModelsChanged(rows, changes.models - {r.model.id for r in rows}))
        if changes.deployments:
            rows = deployment_rows(self.db, changes.deployments)
            self.post_message(DeploymentsChanged(rows, changes.deployments - {d.id for d in rows},
                                                 adapters_by_deployment(self.db, changes.deployments)))
        if changes.community:
            self.post_message(CommunityChanged(models.community_entries(self.db)))

    @staticmethod
    def _live(screen) -> bool:
        """A screen that can be drawn on: mounted, and not being taken down as the app exits (a change
        read just before quitting arrives after the screens' widgets are gone)."""
        return screen.is_mounted and screen.is_attached

    def _tab_screens(self) -> Iterable[DeckScreen]:
        for mode in TAB_MODES:
            screen = self.get_screen(mode)
            if self._live(screen):
                yield screen

    def _open_dialogs(self) -> list:
        """Dialogs that show a model's state (and so follow its changes, as the tab screens do)."""
        return [s for s in self.screen_stack
                if not isinstance(s, DeckScreen) and hasattr(s, "models_changed") and self._live(s)]

    def on_data_loaded(self, message: DataLoaded) -> None:
        self.store.community = {c.repo_id: c for c in message.community}
        self.store.apply_models(message.models, set())
        self.store.apply_deployments(message.deployments, set(), message.adapters)
        self.store.loaded = True
        for screen in self._tab_screens():
            screen.reload()
        self.set_interval(LOAD_EVERY_S, self.poll_load)
        self.watch_gpus()
        if self._open_chat is not None:
            self._chat_on_start(self._open_chat)
        if self._open_compare is not None:
            self.switch_mode("deployments")
            self.open_compare(self._open_compare)
        self.discover_targets()

    # -- load and GPUs: read in workers, kept in the store, shown by whoever shows them ----------------

    def _load_and_gpu_viewers(self) -> list:
        return [s for s in dict.fromkeys([*self._tab_screens(), *self.screen_stack])
                if self._live(s) and hasattr(s, "load_changed")]

    def poll_load(self) -> None:
        ready = {d.id: d.endpoint for d in self.store.deployments.values()  # an external one's are not ours
                 if d.state == DeploymentState.READY and d.endpoint and d.backend != "external"}
        for gone in set(self.store.load) - set(ready):  # stopped: its history ends with it
            del self.store.load[gone]
        reading = any(w.group == "load" and w.is_running for w in self.workers)
        if ready and not reading:  # a slow server holds the reading up: the next waits for it
            self.read_load(ready)

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def read_load(self, endpoints: dict[int, str]) -> None:
        import httpx2 as httpx

        from engine.load import read_load

        if self._load_client is None:  # one for the app's life: each new client sets up TLS, even for http
            self._load_client = httpx.Client()
        samples = {dep_id: (read_load(endpoint, client=self._load_client), time.monotonic())
                   for dep_id, endpoint in endpoints.items()}
        self.call_from_thread(self._show_load, samples)

    def _show_load(self, samples: dict) -> None:
        from engine.load import LoadHistory

        read = set()
        for dep_id, (load, at) in samples.items():
            if load is not None and dep_id in self.store.deployments:
                self.store.load.setdefault(dep_id, LoadHistory()).add(load, at)
                read.add(dep_id)
        for viewer in self._load_and_gpu_viewers():
            viewer.load_changed(read)

    _load_client = None  # the httpx client the load readings share (made in their worker)
    gpu_reader = None  # what reads the ledger (default: engine.gpus.read_ledger); tests give their readings

    @work(thread=True, exclusive=True, exit_on_error=False, group="gpus")
    def watch_gpus(self) -> None:
        """Read the GPUs every GPUS_EVERY_S until the app ends; where the first reading finds none, never
        again (a machine does not gain a GPU while the dashboard runs)."""
        from engine.gpus import read_ledger

        reader = self.gpu_reader or read_ledger
        worker = get_current_worker()
        while not worker.is_cancelled:
            try:
                states = reader(self.db)
            except Exception:  # noqa: BLE001 - a locked database, a GPU fallen off the bus: read again next time
                states = None
            if states is not None:
                self.call_from_thread(self._show_gpus, states)
                if not states:
                    return
            for _ in range(int(GPUS_EVERY_S / POLL_S)):  # in steps: the app's exit does not wait for a sleep
                if worker.is_cancelled:
                    return
                time.sleep(POLL_S)

    def _show_gpus(self, states: list) -> None:
        from engine.gpus import GpuHistory

        if self.store.gpu_history is None:
            self.store.gpu_history = GpuHistory()
        self.store.gpu_history.add([s.gpu for s in states])  # here, on the UI thread that draws it
        self.store.gpus = states
        for viewer in self._load_and_gpu_viewers():
            viewer.gpus_changed()

    @work(thread=True, exclusive=True, group="targets", exit_on_error=False)
    def discover_targets(self) -> None:
        """Where work can run besides this machine (a kubeconfig's contexts, a SLURM cluster's partitions):
        Community offers them for a model not downloaded here. Its own worker: asking SLURM can take a while."""
        from engine import targets

        found, _problems = targets.choices()  # the dialogs' Target field says what could not be listed
        self.call_from_thread(setattr, self.store, "targets", [c for c in found if c.spec])

    def _chat_on_start(self, name: str) -> None:
        named = [d for d in self.store.deployments.values() if d.name == name or str(d.id) == name]
        if not named:
            self.notify(f"No deployment named {name!r}", severity="error", timeout=8)
            return
        dep = max(named, key=lambda d: d.id)  # a name is reused once its deployment stopped: the latest
        self.show_row("deployments", dep.id)
        self.open_chat(dep.id)

    def on_models_changed(self, message: ModelsChanged) -> None:
        self.announce_outcomes(message)
        repos = self.store.apply_models(message.rows, message.gone)
        for screen in [*self._tab_screens(), *self._open_dialogs()]:
            screen.models_changed({r.model.id for r in message.rows}, message.gone, repos)

    def announce_outcomes(self, message: ModelsChanged) -> None:
        """A model that leaves Pending says so, wherever the user is looking."""
        from catalog.states import ModelState

        from engine.format import describe_scored

        for row in message.rows:
            before = self.store.models.get(row.model.id)
            scored = row.model.meta.get("evaluations") or []
            if before is not None and scored and scored[0] != (before.model.meta.get("evaluations") or [None])[0]:
                self.notify(describe_scored(scored[0]), title=f"{row.model.name} evaluated", timeout=10)
            if before is None or before.model.state != ModelState.PENDING or row.model.state == ModelState.PENDING:
                continue
            if row.model.state == ModelState.READY:
                self.notify(f"{row.model.name} is ready", timeout=4)
            elif row.cancelled:  # asked for: not an error
                self.notify(row.model.reason, title=row.model.name, severity="warning", timeout=5)
            else:
                self.notify(row.model.reason or "no reason given", title=f"{row.model.name} failed",
                            severity="error", timeout=12)

    def on_deployments_changed(self, message: DeploymentsChanged) -> None:
        self.announce_deployments(message)
        self.store.apply_deployments(message.rows, message.gone, message.adapters)
        for screen in self._tab_screens():
            screen.deployments_changed({d.id for d in message.rows}, message.gone)

    def on_community_changed(self, message: CommunityChanged) -> None:
        self.store.community = {c.repo_id: c for c in message.community}
        for screen in self._tab_screens():
            screen.reload()

    def announce_deployments(self, message: DeploymentsChanged) -> None:
        """A deployment that leaves Pending says so, wherever the user is looking."""
        for dep in message.rows:
            before = self.store.deployments.get(dep.id)
            if before is None or before.state != DeploymentState.PENDING or dep.state == DeploymentState.PENDING:
                continue
            if dep.state == DeploymentState.READY:
                self.notify(f"{dep.name} is ready at {dep.endpoint}", timeout=5)
            elif dep.state == DeploymentState.FAILED:
                self.notify(dep.reason or "no reason given", title=f"{dep.name} failed", severity="error", timeout=12)

    # -- actions ------------------------------------------------------------------------------------

    def show_row(self, mode: str, key) -> None:
        """Switch to a tab screen with the cursor on a row (as soon as the row is listed)."""
        self.switch_mode(mode)
        self.get_screen(mode).focus_row(key)

    def open_deploy(self, model_id: int | str) -> None:
        """The deploy drawer for a model (a Hub repo id: one a target downloads itself); once deployed, Active
        deployments with the new row selected."""
        from tui.screens.deploy_drawer import DeployDrawer

        def deployed(dep_id: int | None) -> None:
            if dep_id is not None:
                self.show_row("deployments", dep_id)
                self.notify("Deploying: its phase shows here; l for the server log", timeout=5)

        self.push_screen(DeployDrawer(model_id), deployed)

    def connect(self, model_id: int) -> None:
        """Connect: the connection kit of the model's Ready deployment; one still starting is shown in
        Active deployments."""
        live = self.store.live_deployments_of(model_id)
        if not live:
            self.notify("Not deployed: deploy it first (p)", severity="warning", timeout=4)
            return
        chosen = max(live, key=lambda d: (d.state.value == "ready", d.id))  # Ready first, then the latest
        if chosen.state.value == "ready":
            self.open_connect(chosen.id, self.store.served_as(chosen, model_id))
        else:
            self.show_row("deployments", chosen.id)
            self.notify(f"{chosen.name} is still starting; Connect once it is Ready", timeout=4)

    def open_connect(self, deployment_id: int, model: str | None = None) -> None:
        from tui.screens.connect_dialog import ConnectDialog

        self.push_screen(ConnectDialog(deployment_id, model),
                         lambda wish: wish == "chat" and self.open_chat(deployment_id))

    def open_compare(self, names: list[str]) -> None:
        from tui.screens.compare import CompareScreen

        self.push_screen(CompareScreen(names))

    def open_chat(self, deployment_id: int, conversation_id: int | None = None) -> None:
        """The chat pane on a Ready deployment (a model without a chat template is told so)."""
        from tui.screens.chat import ChatScreen

        dep = self.store.deployments.get(deployment_id)
        if dep is None or dep.state.value != "ready":
            self.notify("Chat needs a Ready deployment", severity="warning", timeout=4)
            return
        row = self.store.models.get(dep.model_id) if dep.model_id else None
        if row is not None and row.model.path and not has_chat_template(row.model.path):
            self.notify(f"{row.model.name} has no chat template: it completes text but does not chat "
                        "(use /v1/completions; see Connect)", severity="warning", timeout=6)
            return
        self.push_screen(ChatScreen(deployment_id, conversation_id))

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Every notification is plain text: they carry names, replies and servers' errors, where a '['
        would be read as markup (and a stray closing tag would end the app)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def copy_text(self, text: str | None, what: str, shown: str | None = None) -> None:
        """To the clipboard through the terminal (OSC 52), so it works over SSH; says what it did (`shown`
        in place of the text: a secret, a long snippet)."""
        if text:
            self.copy_to_clipboard(text)
            self.notify(f"Copied {shown or text}", timeout=3)
        else:
            self.notify(f"No {what} to copy", severity="warning", timeout=3)

    def action_gpus(self) -> None:
        from tui import dialogs

        if not isinstance(self.screen, dialogs.GpuDialog):
            self.push_screen(dialogs.GpuDialog())

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpDialog):
            self.push_screen(HelpDialog(self.screen, self.BINDINGS))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette offers Textual's own commands (keys, quit, theme), the three screens and every
        action of every screen, calling the same actions as the keys: the current screen's first, and one
        of another screen switches to it and acts on its selected row."""
        yield from super().get_system_commands(screen)
        yield SystemCommand("GPUs", "This machine's GPUs: load, memory, temperature, power and who holds each (4)",
                            self.action_gpus)
        modes = sorted(TAB_MODES, key=lambda mode: tab_screen_class(mode) is not type(screen))  # the current first
        for mode in modes:
            tab = tab_screen_class(mode)
            title = tab.TAB_TITLE
            if tab is not type(screen):
                yield SystemCommand(f"Go to {title}", f"Switch to the {title} screen", partial(self.switch_mode, mode))
            for binding in tab.BINDINGS:
                if isinstance(binding, Binding) and binding.description and binding.id:
                    where = "" if tab is type(screen) else f" (on {title})"
                    yield SystemCommand(f"{title}: {binding.description}",
                                        (binding.tooltip or f"key: {binding.key}") + where,
                                        partial(self._act_on, mode, binding.action))

    async def _act_on(self, mode: str, action: str) -> None:
        """A screen's action from the palette, wherever it was opened: on that screen, as its key would."""
        if self.current_mode != mode:
            await self.switch_mode(mode)
        await self.get_screen(mode).run_action(action)  # the tab screen's, whatever dialog is on top

    @on(Worker.StateChanged)
    def report_worker_error(self, event: Worker.StateChanged) -> None:
        """One place where a failed background operation becomes a message on screen (screens and
        dialogs forward their workers' changes here: see ReportsWorkerErrors)."""
        if event.state != WorkerState.ERROR:
            return
        error = event.worker.error
        if isinstance(error, (EngineError, CatalogError)):
            self.notify(str(error), title="Cannot do that", severity="error", timeout=10)
        else:
            self.notify(f"{type(error).__name__}: {error}", title="Unexpected error", severity="error", timeout=10)
