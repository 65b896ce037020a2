"""A model's state as the dashboard shows it: the engine's wording, coloured by state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text

from catalog.states import ModelState
from engine.format import state_text

if TYPE_CHECKING:
    from engine.models import ModelRow

STATE_STYLES = {ModelState.READY: "bold green", ModelState.FAILED: "bold red", ModelState.PENDING: "yellow"}


def model_status(row: ModelRow, detail: str = "short", deployed: bool = False) -> Text:
    """`detail`: "tiny" (a narrow column), "short" (a table row), "long" (preview and details).
    `deployed`: a deployment serves the model now (shown beside Ready)."""
    model = row.model
    style = "yellow" if row.cancelled else STATE_STYLES[model.state]  # asked for: not an error
    return Text(state_text(model.state, model.reason, row.job, detail, row.cancelled, deployed), style=style)
