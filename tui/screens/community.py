"""Community: the curated open models. Filter as you type (`/`), narrow by tags (`t`), and take the
primary action (`enter`): Download; follow a download in Custom; Deploy a downloaded model; Connect to a
deployed one. Fine-tune (`f`) and Deploy (`p`) download first when needed, after asking."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding

from catalog.states import ModelState
from engine.community import haystack, matches, terms
from engine.format import human_bytes, human_params
from engine.hub import download_bytes
from tui import dialogs
from tui.screens.base import DeckScreen
from tui.widgets.filter_bar import FilterBar
from tui.widgets.info import InfoLine
from tui.widgets.live_table import Column, LiveTable
from tui.widgets.status import model_status

if TYPE_CHECKING:
    from catalog.schema import CommunityModel


class CommunityScreen(DeckScreen):
    TAB_TITLE = "Community"
    MODE = "community"
    BINDINGS = [
        Binding("slash", "focus_filter", "Filter", id="community.filter", tooltip="Filter by name, description or tag as you type"),
        Binding("t", "pick_tags", "Tags", id="community.tags", tooltip="Narrow to models carrying all chosen tags"),
        Binding("enter", "primary", "Action", id="community.primary", tooltip="The row's action: Download, Deploy, or Connect once deployed"),
        Binding("f", "finetune", "Fine-tune", id="community.finetune", tooltip="Fine-tune the model (downloading it first if needed)"),
        Binding("p", "deploy", "Deploy", id="community.deploy", tooltip="Deploy the model (downloading it first if needed)"),
        Binding("c", "connect", "Connect", id="community.connect", show=False, tooltip="Connect to the model's deployment"),
        Binding("d", "details", "Details", id="community.details", tooltip="Everything known about the model"),
        Binding("y", "copy_link", "Copy link", id="community.copy_link", tooltip="Copy the model's Hugging Face link (works over SSH)"),
    ]
    COLUMNS = [
        Column("Name", ratio=3, min_width=14), Column("Size", width=6), Column("Description", ratio=4, min_width=10),
        Column("Tags", ratio=3, min_width=8), Column("Status", width=14),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self._haystacks: dict[str, str] = {}  # precomputed per row: the filter runs on every keystroke
        self._tagsets: dict[str, frozenset[str]] = {}

    def compose(self) -> ComposeResult:
        yield from self.compose_nav()
        yield FilterBar("/ filter by name, description or tag", id="filter")
        yield InfoLine(id="tags-line", classes="subtle-line")
        yield LiveTable(self.COLUMNS, empty_text="Loading the catalog…", id="table")
        yield InfoLine(id="preview", classes="preview")
        yield from self.compose_footer()

    # -- data ---------------------------------------------------------------------------------------

    def reload(self) -> None:
        entries = self.store.community.values()
        self._haystacks = {e.repo_id: haystack(e) for e in entries}
        self._tagsets = {e.repo_id: frozenset(e.tags) for e in entries}
        self.table.empty_text = "No model matches the filter and tags."
        self.table.set_rows((e.repo_id, self._cells(e)) for e in entries)
        self.apply_filter()
        self._show_tags()

    def models_changed(self, changed: set[int], gone: set[int], repos: set[str]) -> None:
        for repo_id in repos:
            entry = self.store.community.get(repo_id)
            if entry is not None:
                self.table.upsert(repo_id, self._cells(entry))
        if self.table.cursor_key in repos:
            self._show_preview(self.table.cursor_key)

    def deployments_changed(self, changed: set[int], gone: set[int]) -> None:
        for repo_id, entry in self.store.community.items():
            if self.store.model_for_repo(repo_id) is not None:
                self.table.upsert(repo_id, self._cells(entry))
        self._show_preview(self.table.cursor_key)  # its status and row action may have changed

    def _cells(self, entry: CommunityModel) -> tuple:
        return (entry.name, human_params(entry.params), entry.description, ", ".join(entry.tags), self._status(entry))

    def _status(self, entry: CommunityModel) -> Text:
        row = self.store.model_for_repo(entry.repo_id)
        if row is None:
            return Text("Download", style="bold cyan")
        return model_status(row, "tiny", deployed=self.store.is_deployed(row.model.id))

    # -- filtering ----------------------------------------------------------------------------------

    def apply_filter(self) -> None:
        query = terms(" ".join(self.filter_words))
        wanted, tagsets, haystacks = self.tags, self._tagsets, self._haystacks
        if not query and not wanted:
            self.table.set_filter(None)
        else:
            self.table.set_filter(lambda key: matches(haystacks[key], tagsets[key], query, wanted))
        self._show_tags()

    def _show_tags(self) -> None:
        shown, total = len(self.table.visible_keys), self.table.row_count
        tags = ", ".join(sorted(self.tags)) if self.tags else "any"
        self.query_one("#tags-line", InfoLine).update(f" Tags: {tags}  ·  {shown} of {total} models  ·  t tags  / filter  ? keys")

    # -- preview of the highlighted row -------------------------------------------------------------

    def on_live_table_highlighted(self, event: LiveTable.Highlighted) -> None:
        self._show_preview(event.key)

    def _show_preview(self, repo_id: str | None) -> None:
        self.follow_row()
        preview = self.preview_line()
        if preview is None:
            return
        entry = self.store.community.get(repo_id) if repo_id else None
        if entry is None:
            preview.update("")
            return
        text = Text.assemble((entry.name, "bold"), "  ", (entry.link, "underline"), "\n", entry.description, "\n")
        here = self.store.model_for_repo(entry.repo_id)
        if here is not None and here.model.size_bytes:  # what it takes here (a GGUF mirror's: float32)
            download = f", {human_bytes(here.model.size_bytes)} on disk"
        else:
            download = f", about {human_bytes(download_bytes(entry.params))}" if download_bytes(entry.params) else ""
        text.append(f"{human_params(entry.params)} params{download} · licence {entry.license}"
                    + (" · gated" if entry.gated else ""), style="dim")
        text.append(" · ")
        text.append_text(self._status(entry))
        text.append(f" · enter: {self._primary(entry)}", style="dim")
        preview.update(text)

    # -- actions ------------------------------------------------------------------------------------

    def on_live_table_selected(self, event: LiveTable.Selected) -> None:
        self.action_primary()

    def action_pick_tags(self) -> None:
        counts = Counter(tag for entry in self.store.community.values() for tag in entry.tags)

        def chosen(tags: set[str] | None) -> None:
            if tags is not None:
                self.tags = tags
                self.apply_filter()

        self.app.push_screen(dialogs.TagPicker(dict(counts), self.tags), chosen)

    def _entry(self) -> CommunityModel | None:
        key = self.table.cursor_key
        return self.store.community.get(key) if key else None

    def row_actions(self) -> list[str] | None:
        entry = self._entry()
        if entry is None:
            return ["focus_filter", "pick_tags"]
        actions = ["primary", "deploy"] + (["finetune"] if entry.finetunable else [])
        if (row := self.store.model_for_repo(entry.repo_id)) is not None and self.store.is_deployed(row.model.id):
            actions.append("connect")
        return actions + ["pick_tags", "focus_filter", "details", "copy_link"]

    def _primary(self, entry: CommunityModel) -> str:
        """The row's one action, as the seed page names them."""
        row = self.store.model_for_repo(entry.repo_id)
        if row is None or row.model.state == ModelState.FAILED:
            return "Download"
        if self.store.is_deployed(row.model.id):
            return "Connect"
        return "Deploy" if row.model.state == ModelState.READY else "Follow the download in Custom"

    def action_primary(self) -> None:
        entry = self._entry()
        if entry is None:
            return
        row = self.store.model_for_repo(entry.repo_id)
        action = self._primary(entry)
        if action == "Download":
            self.download(entry.repo_id, retrying=row is not None)
        elif action == "Connect":
            self.app.connect(row.model.id)
        elif action == "Deploy":
            self.app.open_deploy(row.model.id)
        else:
            self.app.show_row("custom", row.model.id)

    def action_connect(self) -> None:
        entry = self._entry()
        row = self.store.model_for_repo(entry.repo_id) if entry else None
        if row is None:
            self.notify("Not downloaded yet: download and deploy it first", severity="warning", timeout=4)
        else:
            self.app.connect(row.model.id)

    @work(thread=True, exit_on_error=False, group="engine")
    def download(self, repo_id: str, retrying: bool) -> None:
        from engine import models

        model, _job = models.pull(self.db, repo_id)
        verb = "Retrying the download of" if retrying else "Downloading"
        self.app.call_from_thread(self.notify, f"{verb} {repo_id} as {model.name}; progress in Custom (2)", timeout=4)

    def action_finetune(self) -> None:
        entry = self._entry()
        if entry is None:
            return
        if not entry.finetunable:
            self.notify(f"{entry.name} is not fine-tunable ({entry.task} model)", severity="warning")
            return
        self._downloaded_then(entry, "a fine-tune started now waits for it", self.open_finetune)

    def action_deploy(self) -> None:
        entry = self._entry()
        if entry is not None:
            self._downloaded_then(entry, "a deployment made now starts once it is done", self.app.open_deploy)

    def _downloaded_then(self, entry: CommunityModel, waits: str, then: Callable[[int | str], None]) -> None:
        """Run `then` on the entry's custom model, asking to download it first when it is not here; where a
        target downloads models itself (a cluster), `then` may go on with the repo id instead."""
        row = self.store.model_for_repo(entry.repo_id)
        if row is not None and row.model.state != ModelState.FAILED:
            then(row.model.id)
            return
        self.with_offer(entry, lambda offer: self._ask_download(entry, row, offer, waits, then))

    @work(thread=True, exit_on_error=False, group="offer")
    def with_offer(self, entry: CommunityModel, then: Callable) -> None:
        """What a download of the entry gives here (a mirror's GGUF header is read: not on the UI thread)."""
        from engine.mirrors import offer

        found = offer(entry.repo_id, entry.params, self.db.path.parent)
        self.app.call_from_thread(then, found)

    def _ask_download(self, entry: CommunityModel, row, offer, waits: str, then: Callable[[int | str], None]) -> None:
        verb = "Retry the download of" if row else "Download"
        title = f"{verb} {entry.name} first?"
        message = (f"{entry.name} ({human_params(entry.params)} parameters) is not on this machine yet: "
                   f"{offer.describe()}. It downloads in the background; {waits}.")
        if not self.store.targets or row is not None:  # a failed download is retried where it failed: here
            question = dialogs.ConfirmDialog(title, message, confirm_label="Download", variant="primary")
            self.app.push_screen(question, lambda yes: yes and self.download_then(entry.repo_id, then))
            return
        from engine import targets

        kinds = ", ".join(sorted({targets.kind(choice.kind).TITLE for choice in self.store.targets}))
        question = dialogs.ChoiceDialog(title, f"{message} Or run it on a target that downloads it itself ({kinds}): nothing "
                                               "comes to this machine.",
                                        [("download", "Download", "y"), ("elsewhere", "Run it on a target", "t")])

        def answered(answer: str | None) -> None:
            if answer == "download":
                self.download_then(entry.repo_id, then)
            elif answer == "elsewhere":
                then(entry.repo_id)

        self.app.push_screen(question, answered)

    @work(thread=True, exit_on_error=False, group="engine")
    def download_then(self, repo_id: str, then: Callable[[int], None]) -> None:
        from engine import models

        model, _job = models.pull(self.db, repo_id)
        self.app.call_from_thread(self.notify, f"Downloading {repo_id} as {model.name}; progress in Custom (2)",
                                  timeout=5)
        self.app.call_from_thread(self.when_listed, model.id, then)

    def when_listed(self, model_id: int, then: Callable[[int], None], tries: int = 50) -> None:
        """Call `then` once the live updates have listed the model (dialogs read it from the store)."""
        if model_id not in self.store.models and tries > 0:
            self.set_timer(0.1, lambda: self.when_listed(model_id, then, tries - 1))
            return
        then(model_id)

    def open_finetune(self, model_id: int | str) -> None:
        """The fine-tune dialog with this base chosen (a Hub repo id: for a target that downloads it itself);
        the new adapter is shown in Custom."""
        def started(adapter_id: int | None) -> None:
            if adapter_id is not None:
                self.app.show_row("custom", adapter_id)

        self.app.push_screen(dialogs.FinetuneDialog(model_id), started)

    def action_details(self) -> None:
        entry = self._entry()
        if entry is not None:
            self.with_offer(entry, lambda offer: self._show_details(entry, offer))

    def _show_details(self, entry: CommunityModel, offer) -> None:
        row = self.store.model_for_repo(entry.repo_id)
        fields = [
            ("Repo", entry.repo_id), ("Link", entry.link), ("Description", entry.description),
            ("Task", entry.task), ("Parameters", f"{entry.params:,} ({human_params(entry.params)})"),
            ("Licence", entry.license), ("Gated", "yes: accept the licence on the Hub first" if entry.gated else "no"),
            ("Chat", "yes" if entry.chat else "no"), ("Fine-tunable", "yes" if entry.finetunable else "no"),
            ("Tags", ", ".join(entry.tags)), ("Download", offer.describe()),
            ("Custom model", model_status(row, "long") if row else Text("not downloaded")),
        ]
        self.app.push_screen(dialogs.DetailsDialog(entry.name, fields, copy_value=entry.link))

    def action_copy_link(self) -> None:
        entry = self._entry()
        self.app.copy_text(entry.link if entry else None, "link")
