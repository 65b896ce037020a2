"""The catalog: modeldeck's SQLite database (the one source of truth) and the curated community data.

Knows nothing of `engine` or `tui`; every process (dashboard, CLI, job) opens it with `open_database()`.
"""

from catalog.db import CatalogError, Database, home_dir, open_database

__all__ = ["CatalogError", "Database", "home_dir", "open_database"]
