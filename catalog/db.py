"""Opening the database: location, pragmas, schema migrations, and read/write sessions.

Every process shares one SQLite file in WAL mode. Writes run in `BEGIN IMMEDIATE` transactions so two
writers queue on the busy timeout instead of failing with "database is locked" when a read
transaction tries to upgrade to a write.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlmodel import Session

from catalog.errors import CatalogError
from catalog.migrations import MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT_S = 30.0
DB_FILENAME = "modeldeck.db"


def make_private(path: Path, notices: list[str] | None = None) -> None:
    """Take group and other access away from `path` (what the user lets others do is theirs to decide
    elsewhere, but the home holds API keys: GPU machines are shared). Says what it changed in `notices`."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 and info.st_uid == os.geteuid():
        os.chmod(path, mode & ~0o077)
        if notices is not None:
            notices.append(f"{path} was readable by other users (mode {mode:o}); now {mode & ~0o077:o}")


def private_file(path: Path) -> None:
    """Create `path` readable by its owner alone, before anything writes to it (an existing one is kept)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass


def home_dir() -> Path:
    """MODELDECK_HOME, else the platform's user data directory (created, checked writable)."""
    from catalog import settings

    configured = settings.current().home  # MODELDECK_HOME, else the config file's; empty means unset
    home = Path(configured).expanduser() if configured else Path(platformdirs.user_data_dir("modeldeck"))
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CatalogError(f"cannot create modeldeck home {home}: {exc.strerror}") from exc
    if not os.access(home, os.W_OK | os.X_OK):
        hint = "set MODELDECK_HOME to a writable folder" if not configured else "fix its permissions"
        raise CatalogError(f"modeldeck home {home} is not writable ({hint})")
    return home


def _schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(path: Path) -> None:
    """Bring the file at `path` to SCHEMA_VERSION, backing it up first when it holds data."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        try:
            conn.execute("BEGIN")  # one snapshot: another process may be migrating this very file
            version = _schema_version(conn)
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]  # fails if corrupt
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise CatalogError(f"{path} is not a modeldeck database ({exc}); move it aside to start afresh") from exc
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"{path} has schema version {version}, newer than this modeldeck understands "
                f"({SCHEMA_VERSION}); upgrade modeldeck"
            )
        if version == 0 and tables:
            raise CatalogError(f"{path} is an SQLite database of another program (it has tables but no "
                               f"modeldeck schema version); point MODELDECK_HOME elsewhere")
        conn.execute("PRAGMA journal_mode=WAL")  # persistent; only once we know the file is ours
        if version == SCHEMA_VERSION:
            return
        if version > 0:  # keep the user's data as it was, whatever happens next
            backup = sqlite3.connect(path.with_name(f"{path.name}.v{version}.bak"))
            conn.backup(backup)
            backup.close()
        conn.execute("BEGIN IMMEDIATE")
        version = _schema_version(conn)  # another process may have migrated while we waited
        if version == SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            return
        try:
            for number in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.execute("ROLLBACK")
            raise CatalogError(f"upgrading {path} from schema {version} failed: {exc}") from exc
    finally:
        conn.close()


@contextmanager
def worded(path: Path) -> Iterator[None]:
    """SQLite's failures of the file itself (damaged, read-only, locked too long) as one line that says what
    to do, instead of SQLAlchemy's statement dump."""
    from sqlalchemy.exc import DatabaseError

    try:
        yield
    except DatabaseError as exc:
        cause = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        if "malformed" in cause or "not a database" in cause:
            problem = (f"the database {path} is damaged ({cause}): restore a backup ({path.name}.v*.bak beside "
                       f"it, if any), or move it aside and modeldeck starts a new one; "
                       f"`sqlite3 {path} .recover` may save its rows")
        elif "readonly" in cause:
            problem = f"the database {path} is read-only ({cause}): modeldeck writes it; give yourself write access"
        elif "locked" in cause or "busy" in cause:
            problem = (f"the database {path} stayed locked for {BUSY_TIMEOUT_S:.0f} s ({cause}): another "
                       "process holds it; try again")
        elif "unable to open" in cause or "disk I/O" in cause or "full" in cause:
            problem = f"cannot use the database {path} ({cause}): check the disk and the folder's permissions"
        else:
            raise
        raise CatalogError(problem) from exc


class Database:
    """One SQLite file. `read()` and `write()` give SQLModel sessions; use one per unit of work."""

    def __init__(self, path: Path, notices: list[str] | None = None):
        self.path = path
        self.notices = notices or []  # what opening it changed that the user should hear of once
        self.engine: Engine = create_engine(
            f"sqlite:///{path}", connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        )
        self._write_engine = self.engine.execution_options(modeldeck_write=True)

        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            dbapi_conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            dbapi_conn.execute("PRAGMA foreign_keys = ON")
            dbapi_conn.execute("PRAGMA synchronous = NORMAL")

        @event.listens_for(self.engine, "begin")
        def _on_begin(conn):
            immediate = conn.get_execution_options().get("modeldeck_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    @contextmanager
    def read(self) -> Iterator[Session]:
        with worded(self.path), Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed on success and rolled back on error."""
        with worded(self.path), Session(self._write_engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def close(self) -> None:
        self.engine.dispose()


def open_database(path: Path | None = None) -> Database:
    """Open (creating or migrating as needed) the database at `path` or in the modeldeck home."""
    path = path or home_dir() / DB_FILENAME
    if path.exists() and path.is_dir():
        raise CatalogError(f"{path} is a directory, expected the modeldeck database file")
    # It holds every deployment's API key: its folder and its files are the user's alone. SQLite gives its
    # -wal and -shm files the database file's mode.
    notices: list[str] = []
    for private in [path.parent, path.parent / "logs", path,
                    *(path.with_name(path.name + end) for end in ("-wal", "-shm"))]:
        make_private(private, notices)
    for backup in path.parent.glob(f"{path.name}.v*.bak"):
        make_private(backup, notices)
    private_file(path)
    migrate(path)
    return Database(path, notices)
