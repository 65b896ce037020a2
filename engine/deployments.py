"""Deployments as the dashboard and CLI read them. Serving backends arrive with the deployments work."""

from __future__ import annotations

from sqlmodel import select

from catalog import Database
from catalog.schema import Deployment


def deployment_rows(db: Database, ids: set[int] | None = None) -> list[Deployment]:
    with db.read() as session:
        query = select(Deployment).order_by(Deployment.created_at)
        if ids is not None:
            query = query.where(Deployment.id.in_(list(ids)))
        return list(session.exec(query))
