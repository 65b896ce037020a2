"""The engine: every operation of modeldeck, for the dashboard and the CLI alike. Never imports Textual."""

from __future__ import annotations

from pathlib import Path

from catalog import Database, open_database
from catalog.curated import load_curated, upsert_curated
from engine import jobs


def start(db_path: Path | None = None) -> Database:
    """Open the database, bring the curated catalog up to date, and settle jobs whose process is gone."""
    db = open_database(db_path)
    upsert_curated(db, load_curated())
    jobs.reconcile(db)
    return db
