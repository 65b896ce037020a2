"""The append-only event log: written beside every state change, followed by the dashboard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from catalog import Database
from catalog.schema import Event


def record(session: Session, subject: str, kind: str, message: str = "", **data: Any) -> None:
    """Append an event in the caller's transaction, so it is seen exactly when the change is."""
    session.add(Event(subject=subject, kind=kind, message=message, data_json=Event.dumps(data)))


@dataclass
class Changes:
    """What a batch of events touched, by table and key."""

    models: set[int] = field(default_factory=set)
    jobs: set[int] = field(default_factory=set)
    deployments: set[int] = field(default_factory=set)
    community: bool = False

    def __bool__(self) -> bool:
        return bool(self.models or self.jobs or self.deployments or self.community)


class EventFollower:
    """Reads the events appended since the last poll. Cheap when nothing happened (one indexed query)."""

    def __init__(self, db: Database, from_start: bool = False):
        self.db = db
        self.last_id = 0
        if not from_start:
            with db.read() as session:
                self.last_id = session.exec(select(func.max(Event.id))).one() or 0

    def poll(self) -> Changes:
        changes = Changes()
        with self.db.read() as session:
            rows = session.exec(
                select(Event.id, Event.subject, Event.data_json).where(Event.id > self.last_id).order_by(Event.id)
            ).all()
        for event_id, subject, data_json in rows:
            self.last_id = event_id
            table, _, key = subject.partition(":")
            if table == "community":
                changes.community = True
            elif table == "model":
                changes.models.add(int(key))
            elif table == "job":
                changes.jobs.add(int(key))
                model_id = Event.loads(data_json, {}).get("model_id")
                if model_id is not None:
                    changes.models.add(model_id)
            elif table == "deployment":
                changes.deployments.add(int(key))
        return changes
