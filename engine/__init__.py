"""The engine: every operation of modeldeck, for the dashboard and the CLI alike. Never imports Textual.

Importing the package is cheap; modules that touch the database load SQLAlchemy when they are imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catalog.db import Database


def start(db_path: Path | None = None) -> Database:
    """Open the database, bring the curated catalog up to date, and settle jobs whose process is gone."""
    from catalog.curated import load_curated, upsert_curated
    from catalog.db import open_database
    from engine import jobs

    db = open_database(db_path)
    upsert_curated(db, load_curated())
    jobs.reconcile(db)
    return db
