"""The dashboard's in-memory copy of the database rows it shows, patched by key as events arrive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catalog.schema import CommunityModel, Deployment
    from engine.gpus import GpuHistory, GpuState
    from engine.load import LoadHistory
    from engine.models import ModelRow
    from engine.targets import Choice


@dataclass
class Store:
    loaded: bool = False
    community: dict[str, CommunityModel] = field(default_factory=dict)  # by repo id, curated order
    models: dict[int, ModelRow] = field(default_factory=dict)
    deployments: dict[int, Deployment] = field(default_factory=dict)
    adapters: dict[int, list[tuple[str, int | None]]] = field(default_factory=dict)  # by deployment: served as, model
    targets: list[Choice] = field(default_factory=list)  # where work can run besides this machine, once known
    load: dict[int, LoadHistory] = field(default_factory=dict)  # each Ready deployment's, read from its /metrics
    gpus: list[GpuState] = field(default_factory=list)  # this machine's GPUs and who holds them (none: no GPU)
    gpu_history: GpuHistory | None = None
    _by_repo: dict[str, int] = field(default_factory=dict)

    def apply_models(self, rows: list[ModelRow], gone: set[int]) -> set[str]:
        """Patch model rows; returns the repo ids whose community row must change too."""
        touched = set()
        for model_id in gone:
            row = self.models.pop(model_id, None)
            if row is not None and row.model.repo_id:
                self._by_repo.pop(row.model.repo_id, None)
                touched.add(row.model.repo_id)
        for row in rows:
            self.models[row.model.id] = row
            if row.model.repo_id:
                self._by_repo[row.model.repo_id] = row.model.id
                touched.add(row.model.repo_id)
        return touched

    def apply_deployments(self, rows: list[Deployment], gone: set[int],
                          adapters: dict[int, list[tuple[str, int | None]]]) -> None:
        for dep_id in gone:
            self.deployments.pop(dep_id, None)
            self.adapters.pop(dep_id, None)
        for dep in rows:
            self.deployments[dep.id] = dep
            self.adapters[dep.id] = adapters.get(dep.id, [])

    def adapters_beside(self, deployment: Deployment) -> list[tuple[str, int | None]]:
        """The adapters a deployment serves beside what it was deployed as (a deployed adapter is the deployment
        itself)."""
        return [(name, model_id) for name, model_id in self.adapters.get(deployment.id, [])
                if model_id is None or model_id != deployment.model_id]

    def serving(self, model_id: int) -> list[Deployment]:
        """The live deployments that serve this adapter beside their base."""
        return [self.deployments[dep_id] for dep_id, served in self.adapters.items()
                if dep_id in self.deployments and self.deployments[dep_id].state.is_live()
                and self.deployments[dep_id].model_id != model_id and any(m == model_id for _, m in served)]

    def model_for_repo(self, repo_id: str) -> ModelRow | None:
        """The custom model downloaded from `repo_id`, if any."""
        model_id = self._by_repo.get(repo_id)
        return self.models.get(model_id) if model_id is not None else None

    def deployments_of(self, model_id: int) -> list[Deployment]:
        return [d for d in self.deployments.values() if d.model_id == model_id]

    def live_deployments_of(self, model_id: int) -> list[Deployment]:
        """Those serving the model now, or about to (Pending or Ready): deployed as it, or with it beside their
        base (an adapter)."""
        return [d for d in self.deployments_of(model_id) if d.state.is_live()] + self.serving(model_id)

    def served_as(self, deployment: Deployment, model_id: int) -> str | None:
        """The name a deployment serves a model beside its base under (None: it is what it was deployed as)."""
        if deployment.model_id == model_id:
            return None
        return next((name for name, served in self.adapters.get(deployment.id, []) if served == model_id), None)

    def is_deployed(self, model_id: int) -> bool:
        return bool(self.live_deployments_of(model_id))
