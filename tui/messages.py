"""App-wide messages: data read in a worker thread, delivered to the UI thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from catalog.schema import CommunityModel, Deployment
    from engine.models import ModelRow


Adapters = dict[int, list[tuple[str, "int | None"]]]  # by deployment: (served name, the adapter's model id)


class DataLoaded(Message):
    """Everything, read once after the first paint."""

    def __init__(self, community: list[CommunityModel], models: list[ModelRow], deployments: list[Deployment],
                 adapters: Adapters):
        super().__init__()
        self.community, self.models, self.deployments, self.adapters = community, models, deployments, adapters


class ModelsChanged(Message):
    """Custom model rows that changed (`rows`) or disappeared (`gone`), per the event log."""

    def __init__(self, rows: list[ModelRow], gone: set[int]):
        super().__init__()
        self.rows, self.gone = rows, gone


class DeploymentsChanged(Message):
    def __init__(self, rows: list[Deployment], gone: set[int], adapters: Adapters | None = None):
        """`adapters`: those of the deployments in `rows` (one without any is not in it)."""
        super().__init__()
        self.rows, self.gone, self.adapters = rows, gone, adapters or {}


class CommunityChanged(Message):
    def __init__(self, community: list[CommunityModel]):
        super().__init__()
        self.community = community
