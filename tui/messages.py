"""App-wide messages: data read in a worker thread, delivered to the UI thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from catalog.schema import CommunityModel, Deployment
    from engine.models import ModelRow


class DataLoaded(Message):
    """Everything, read once after the first paint."""

    def __init__(self, community: list[CommunityModel], models: list[ModelRow], deployments: list[Deployment]):
        super().__init__()
        self.community, self.models, self.deployments = community, models, deployments


class ModelsChanged(Message):
    """Custom model rows that changed (`rows`) or disappeared (`gone`), per the event log."""

    def __init__(self, rows: list[ModelRow], gone: set[int]):
        super().__init__()
        self.rows, self.gone = rows, gone


class DeploymentsChanged(Message):
    def __init__(self, rows: list[Deployment], gone: set[int]):
        super().__init__()
        self.rows, self.gone = rows, gone


class CommunityChanged(Message):
    def __init__(self, community: list[CommunityModel]):
        super().__init__()
        self.community = community
