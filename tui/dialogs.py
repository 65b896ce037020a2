"""The dialogs the tab screens open, each imported when it is first opened: none is needed for the first
paint, and together they (and what they import: RichLog's pretty-printer, the mirrors' metadata) were a
third of the import time before it (bench/cold_start.py)."""

from __future__ import annotations

import importlib

_MODULES = {
    "ActionMenu": "tui.screens.action_menu", "ChoiceDialog": "tui.screens.confirm", "ConfirmDialog": "tui.screens.confirm",
    "DeploymentDetails": "tui.screens.details", "DetailsDialog": "tui.screens.details", "LiveDetails": "tui.screens.details", "TrainingDetails": "tui.screens.details",
    "FinetuneDialog": "tui.screens.finetune_dialog", "GpuDialog": "tui.screens.gpu_dialog", "ImportDialog": "tui.screens.import_dialog",
    "LogDialog": "tui.screens.log_dialog", "TagPicker": "tui.screens.tag_picker",
    "EvaluateDialog": "tui.screens.evaluate_dialog",
}


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
