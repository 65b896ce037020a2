"""The catalog: modeldeck's SQLite database (the one source of truth) and the curated community data.

Knows nothing of `engine` or `tui`; every process (dashboard, CLI, job) opens it with `open_database()`.
Names are loaded on first use, so importing a light module (catalog.states) does not load SQLAlchemy.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catalog.db import Database, home_dir, open_database
    from catalog.errors import CatalogError

__all__ = ["CatalogError", "Database", "home_dir", "open_database"]


def __getattr__(name: str):
    if name == "CatalogError":
        from catalog.errors import CatalogError

        return CatalogError
    if name in ("Database", "home_dir", "open_database"):
        from catalog import db

        return getattr(db, name)
    raise AttributeError(f"module 'catalog' has no attribute {name!r}")
