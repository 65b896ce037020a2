"""The tables. Enum values are stored as lowercase text; the event log is append-only."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from sqlalchemy.types import String, TypeDecorator
from sqlmodel import Field, SQLModel

from catalog.states import (  # noqa: F401  (re-exported: the tables' columns use them)
    DEPLOYMENT_TRANSITIONS,
    JOB_TRANSITIONS,
    MODEL_TRANSITIONS,
    DeploymentState,
    JobKind,
    JobState,
    ModelKind,
    ModelState,
)


def now() -> float:
    return time.time()


class EnumText(TypeDecorator):
    """Stores a StrEnum as its lowercase value (readable in the raw database), loads it back as the enum."""

    impl = String
    cache_ok = True

    def __init__(self, enum_cls: type[StrEnum]):
        super().__init__()
        self.enum_cls = enum_cls

    def process_bind_param(self, value, dialect):
        return None if value is None else self.enum_cls(value).value

    def process_result_value(self, value, dialect):
        return None if value is None else self.enum_cls(value)


class JsonMixin:
    """Helpers for the JSON text columns (SQLite has no JSON type worth depending on)."""

    @staticmethod
    def dumps(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    @staticmethod
    def loads(text: str | None, default: Any = None) -> Any:
        if not text:
            return default
        return json.loads(text)


class CommunityModel(SQLModel, JsonMixin, table=True):
    __tablename__ = "community_model"

    repo_id: str = Field(primary_key=True)
    name: str
    link: str
    description: str
    task: str
    tags_json: str = "[]"
    params: int  # parameter count
    license: str
    gated: bool = False
    chat: bool = False
    finetunable: bool = False
    position: int = 0  # order in the curated file
    updated_at: float = Field(default_factory=now)

    @property
    def tags(self) -> list[str]:
        return self.loads(self.tags_json, [])


class Model(SQLModel, JsonMixin, table=True):
    """A custom model: a downloaded or imported base model, a merged model or an adapter."""

    __tablename__ = "model"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    kind: ModelKind = Field(default=ModelKind.BASE, sa_type=EnumText(ModelKind))
    state: ModelState = Field(default=ModelState.PENDING, sa_type=EnumText(ModelState))
    reason: str | None = None  # why it failed
    source: str  # e.g. "hub:Qwen/Qwen2.5-0.5B-Instruct", "import:/data/llama", "mirror:..."
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None  # where its files are (HF cache snapshot or MODELDECK_HOME/models/NAME)
    owns_path: bool = False  # True when path is ours to delete (MODELDECK_HOME/models)
    size_bytes: int | None = None
    base_id: int | None = Field(default=None, foreign_key="model.id")
    job_id: int | None = None  # the job that made it (no FK: jobs outlive or predate models)
    meta_json: str = "{}"
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)

    @property
    def meta(self) -> dict[str, Any]:
        return self.loads(self.meta_json, {})


class Job(SQLModel, JsonMixin, table=True):
    __tablename__ = "job"

    id: int | None = Field(default=None, primary_key=True)
    kind: JobKind = Field(sa_type=EnumText(JobKind))
    state: JobState = Field(default=JobState.QUEUED, sa_type=EnumText(JobState))
    model_id: int | None = Field(default=None, foreign_key="model.id", ondelete="SET NULL")
    title: str = ""
    params_json: str = "{}"
    pid: int | None = None
    pid_started_at: float | None = None  # process create time: a reused pid is never taken for ours
    host: str | None = None  # where that process runs (MODELDECK_HOME may be shared by several login nodes)
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    progress: float | None = None  # 0..1
    bytes_done: int | None = None
    bytes_total: int | None = None
    rate: float | None = None  # bytes/s
    eta_s: float | None = None
    metrics_json: str = "{}"
    log_path: str | None = None
    error: str | None = None
    created_at: float = Field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def params(self) -> dict[str, Any]:
        return self.loads(self.params_json, {})


class Deployment(SQLModel, JsonMixin, table=True):
    __tablename__ = "deployment"

    id: int | None = Field(default=None, primary_key=True)
    model_id: int | None = Field(default=None, foreign_key="model.id")
    name: str
    backend: str  # vllm | transformers | kubernetes | external
    state: DeploymentState = Field(default=DeploymentState.PENDING, sa_type=EnumText(DeploymentState))
    phase: str | None = None
    reason: str | None = None
    endpoint: str | None = None
    served_name: str | None = None
    api_key: str | None = None
    gpus: str | None = None
    job_id: int | None = None
    settings_json: str = "{}"
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)
    ends_at: float | None = None  # when its target ends it (a batch job's time limit)


class DeploymentAdapter(SQLModel, JsonMixin, table=True):
    """An adapter a deployment serves beside its base model, under its own name (a request names it)."""

    __tablename__ = "deployment_adapter"

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: int = Field(foreign_key="deployment.id", ondelete="CASCADE", index=True)
    model_id: int | None = Field(default=None, foreign_key="model.id", ondelete="SET NULL")
    served_name: str
    created_at: float = Field(default_factory=now)


class Conversation(SQLModel, JsonMixin, table=True):
    """A chat with one deployment, kept to reopen; its settings are the chat pane's."""

    __tablename__ = "conversation"

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: int = Field(foreign_key="deployment.id", ondelete="CASCADE", index=True)
    title: str = ""
    system_prompt: str = ""
    params_json: str = "{}"  # temperature, top_p, max_tokens
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class ChatMessage(SQLModel, JsonMixin, table=True):
    __tablename__ = "chat_message"

    id: int | None = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversation.id", ondelete="CASCADE", index=True)
    role: str  # user | assistant
    content: str = ""
    stats_json: str = "{}"  # an assistant reply's: ttft_s, tokens, tokens_per_s, finish, error
    created_at: float = Field(default_factory=now)


class Event(SQLModel, JsonMixin, table=True):
    __tablename__ = "event"

    id: int | None = Field(default=None, primary_key=True)
    at: float = Field(default_factory=now)
    subject: str  # "model:3", "job:7", "deployment:2", "community"
    kind: str  # created | state | progress | deleted | updated
    message: str = ""
    data_json: str = "{}"
