"""How a model's state reads on screen: Pending with live progress, Ready, Failed with the reason."""

from __future__ import annotations

from rich.text import Text

from typing import TYPE_CHECKING

from catalog.states import ModelState
from engine.format import job_progress

if TYPE_CHECKING:
    from engine.models import ModelRow

def model_status(row: ModelRow, short: bool) -> Text:
    model = row.model
    if model.state == ModelState.READY:
        return Text("Ready", style="bold green")
    if model.state == ModelState.FAILED:
        return Text("Failed" if short else f"Failed: {model.reason}", style="bold red")
    progress = job_progress(row.job, short) if row.job else "waiting"
    return Text(f"Pending {progress}", style="yellow")
