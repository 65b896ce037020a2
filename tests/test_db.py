"""The database against a real SQLite file: pragmas, migrations, bad files, two writers at once."""

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel, select

from catalog import CatalogError, open_database
from catalog.db import home_dir
from catalog.migrations import MIGRATIONS, SCHEMA_VERSION
from catalog.schema import Job, JobKind, Model, ModelState


def test_pragmas_wal_foreign_keys_busy_timeout(isolated):
    db = open_database()
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA user_version").scalar() == SCHEMA_VERSION
    assert db.path == isolated / "modeldeck.db"


def test_foreign_keys_are_enforced(isolated):
    db = open_database()
    with pytest.raises(Exception, match="FOREIGN KEY"):
        with db.write() as session:
            session.add(Model(name="orphan", source="x", base_id=999))


def test_migrations_agree_with_the_table_definitions(tmp_path):
    """The frozen SQL and the SQLModel classes describe the same columns."""
    migrated = open_database(tmp_path / "migrated.db")
    fresh = create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    SQLModel.metadata.create_all(fresh)
    a, b = inspect(migrated.engine), inspect(fresh)
    assert set(a.get_table_names()) == set(b.get_table_names())
    for table in b.get_table_names():
        cols_a = {c["name"]: (str(c["type"]), c["nullable"]) for c in a.get_columns(table)}
        cols_b = {c["name"]: (str(c["type"]), c["nullable"]) for c in b.get_columns(table)}
        assert cols_a == cols_b, table


def test_upgrade_from_schema_1_keeps_data_and_a_backup(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO model (name, kind, state, source, owns_path, meta_json, created_at, updated_at) "
                 "VALUES ('kept', 'base', 'ready', 'import:/x', 0, '{}', 1, 1)")
    conn.execute("INSERT INTO job (kind, state, title, params_json, metrics_json, created_at) "
                 "VALUES ('download', 'succeeded', 't', '{}', '{}', 1)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    db = open_database(path)
    with db.read() as session:
        assert session.exec(select(Model)).one().name == "kept"
        job = session.exec(select(Job)).one()
        assert job.cancel_requested is False  # the column schema 2 added, with its default
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA user_version").scalar() == SCHEMA_VERSION
    backup = tmp_path / "old.db.v1.bak"
    assert backup.exists()
    assert sqlite3.connect(backup).execute("SELECT name FROM model").fetchone() == ("kept",)


def test_upgrade_to_targets_keeps_every_job_and_deployment_where_it_runs(tmp_path):
    """Schema 4: a job's output folder was its params' "target", a cluster job's target was in "cluster" or
    its deployment's settings; a Kubernetes deployment's image sat beside its other settings."""
    import json

    from catalog.schema import Deployment
    from engine import targets
    from engine.backends import DeploySettings

    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path)
    for step in MIGRATIONS[:3]:
        conn.executescript(step)
    settings = {"backend": "auto", "gpus": "auto", "tensor_parallel": 1, "dtype": "auto", "max_model_len": 0,
                "gpu_memory_fraction": 0.9, "port": 8001, "host": "127.0.0.1", "served_name": ""}
    for name, backend, extra in (("here", "transformers", {"target": "", "image": ""}),
                                 ("there", "kubernetes", {"target": "emu/ml", "image": "vllm/vllm-openai:v0.11.0"})):
        conn.execute("INSERT INTO deployment (name, backend, state, settings_json, created_at, updated_at) "
                     "VALUES (?, ?, 'stopped', ?, 1, 1)", (name, backend, json.dumps(settings | extra)))
    for kind, params in (("finetune", {"target": "/home/u/models/a", "base_id": 1}),
                         ("finetune", {"target": "/home/u/models/b", "cluster": {"target": "emu/ml", "uid": "u1"}}),
                         ("serve", {"deployment_id": 2, "on_cluster": True}), ("serve", {"deployment_id": 1}),
                         ("import", {"gguf": "/x.gguf", "target": "/home/u/models/c"}), ("download", {"repo_id": "a/b"})):
        conn.execute("INSERT INTO job (kind, state, title, params_json, metrics_json, created_at, cancel_requested) "
                     "VALUES (?, 'failed', 't', ?, '{}', 1, 0)", (kind, json.dumps(params)))
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()

    db = open_database(path)
    with db.read() as session:
        found = [(job.kind.value, targets.of_job(job).spec, job.params.get("output"))
                 for job in session.exec(select(Job).order_by(Job.id))]
        here, there = session.exec(select(Deployment).order_by(Deployment.id)).all()
    assert found == [("finetune", "", "/home/u/models/a"), ("finetune", "emu/ml", "/home/u/models/b"),
                     ("serve", "emu/ml", None), ("serve", "", None), ("import", "", "/home/u/models/c"),
                     ("download", "", None)]
    assert DeploySettings.of(there).options == {"image": "vllm/vllm-openai:v0.11.0"}
    assert DeploySettings.of(here).options == {} and DeploySettings.of(here).port == 8001


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(CatalogError, match=r"future\.db has schema version .*newer.*upgrade modeldeck"):
        open_database(path)
    assert path.read_bytes() == before


def test_corrupt_database_is_refused_untouched(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    before = path.read_bytes()
    with pytest.raises(CatalogError, match=r"corrupt\.db is not a modeldeck database"):
        open_database(path)
    assert path.read_bytes() == before


def test_unwritable_home_is_a_clear_error(tmp_path, monkeypatch):
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("a file, not a folder")
        monkeypatch.setenv("MODELDECK_HOME", str(blocker / "home"))  # root can write anywhere; not under a file
        with pytest.raises(CatalogError, match="cannot create modeldeck home"):
            home_dir()
    else:
        home = tmp_path / "ro"
        home.mkdir(mode=0o500)
        monkeypatch.setenv("MODELDECK_HOME", str(home))
        with pytest.raises(CatalogError, match="not writable"):
            home_dir()


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sqlmodel import select
    from catalog import open_database
    from catalog.schema import Job, JobKind
    db = open_database(Path(sys.argv[1]))
    for i in range(int(sys.argv[3])):
        with db.write() as session:
            # read, then write, in one transaction: the pattern that fails with deferred transactions
            count = len(session.exec(select(Job.id).where(Job.title == sys.argv[2])).all())
            session.add(Job(kind=JobKind.DOWNLOAD, title=sys.argv[2], params_json=str(count)))
""")


def test_two_processes_write_at_once_without_locking_errors(tmp_path):
    path = tmp_path / "shared.db"
    open_database(path).close()
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(n)],
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    conn = sqlite3.connect(path)
    for name in ("a", "b"):
        counts = [int(r[0]) for r in conn.execute("SELECT params_json FROM job WHERE title=? ORDER BY id", (name,))]
        assert counts == list(range(n))  # every read saw every earlier write of its own process


def test_state_enums_are_stored_as_readable_text(isolated):
    db = open_database()
    with db.write() as session:
        session.add(Model(name="m", source="x", state=ModelState.FAILED, reason="because"))
        session.add(Job(kind=JobKind.IMPORT, title="t"))
    conn = sqlite3.connect(Path(db.path))
    assert conn.execute("SELECT kind, state FROM model").fetchone() == ("base", "failed")
    assert conn.execute("SELECT kind, state FROM job").fetchone() == ("import", "queued")


def test_another_programs_database_is_refused_untouched(tmp_path):
    path = tmp_path / "theirs.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE accounts (id INTEGER, name TEXT)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(CatalogError, match="database of another program"):
        open_database(path)
    assert path.read_bytes() == before


def test_an_empty_modeldeck_home_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELDECK_HOME", "")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert home_dir() == tmp_path / "data" / "modeldeck"


def test_the_home_the_database_and_the_logs_are_the_users_alone_and_tightened_once(tmp_path, monkeypatch):
    """Deployments' API keys live in the database: on a shared GPU machine no other user may read it."""
    import stat

    from engine.jobs import logs_dir

    home = tmp_path / "shared"
    (home / "logs").mkdir(parents=True)
    for folder in (home, home / "logs"):
        folder.chmod(0o755)
    (home / "modeldeck.db").touch(mode=0o644)
    monkeypatch.setenv("MODELDECK_HOME", str(home))
    db = open_database()
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert (mode(home), mode(home / "logs"), mode(db.path)) == (0o700, 0o700, 0o600)
    assert len(db.notices) == 3 and "readable by other users (mode 644); now 600" in db.notices[2]
    with db.write() as session:  # the WAL and its index come into being with the database's mode
        session.add(Model(name="m", source="x"))
    assert mode(db.path.with_name("modeldeck.db-wal")) == 0o600
    assert open_database().notices == []  # said once

    fresh = tmp_path / "fresh"
    monkeypatch.setenv("MODELDECK_HOME", str(fresh))
    new = open_database()
    assert (mode(fresh), mode(new.path), mode(logs_dir(new))) == (0o700, 0o600, 0o700) and new.notices == []


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as a second Unix user needs root (to switch to it)")
def test_another_local_user_cannot_read_the_database_or_a_log(monkeypatch):
    import shutil
    import tempfile

    tmp_path = Path(tempfile.mkdtemp())  # pytest's own folders are closed to other users already
    tmp_path.chmod(0o755)
    monkeypatch.setenv("MODELDECK_HOME", str(tmp_path / "home"))
    db = open_database()
    log = db.path.parent / "logs" / "job-1-serve.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("sk-secret\n")
    log.chmod(0o644)  # even a log left open: its folder keeps it
    readable = tmp_path / "open.txt"  # the probe works: a file left open to all is read by the other user
    readable.write_text("anyone")
    readable.chmod(0o644)
    nobody = 65534

    def read_as_nobody(path) -> subprocess.CompletedProcess:
        return subprocess.run(["cat", str(path)], user=nobody, capture_output=True, text=True)

    try:
        assert read_as_nobody(readable).stdout == "anyone"
        for path in (db.path, log):
            denied = read_as_nobody(path)
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
    finally:
        shutil.rmtree(tmp_path)


def damaged_database(model_dir: Path) -> Path:
    """A database with rows, whose pages after the schema's are overwritten, as a bad disk might; its header and
    schema intact."""
    from engine import models

    db = open_database()
    with db.engine.connect() as conn:  # the schema's pages, made before any row
        intact = conn.exec_driver_sql("PRAGMA page_count").scalar() * conn.exec_driver_sql("PRAGMA page_size").scalar()
    for n in range(40):  # enough rows for pages past the schema's
        models.import_path(db, model_dir, f"m{n}")
    db.close()
    data = bytearray(db.path.read_bytes())
    data[intact:] = b"\xab" * (len(data) - intact)
    db.path.write_bytes(data)
    return db.path


def test_a_damaged_database_is_one_clear_line_from_the_cli(isolated, tiny_model_dir):
    path = damaged_database(tiny_model_dir)
    try:
        ran = subprocess.run([sys.executable, "-m", "tui.cli", "ls"], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 1
        said = ran.stderr.strip().splitlines()
        assert len(said) == 1 and "is damaged (database disk image is malformed)" in said[0], ran.stderr
        assert ".recover" in said[0]  # and what may save its rows
    finally:
        path.unlink()  # what the tests' cleanup opens must open


def test_a_read_only_database_is_said_as_such(isolated):
    from sqlalchemy import text

    from catalog.db import worded

    db = open_database()
    db.close()
    read_only = create_engine(f"sqlite:///file:{db.path}?mode=ro&uri=true")  # what SQLite says of a 0400 file
    with pytest.raises(CatalogError, match="is read-only .*attempt to write a readonly database.*write access"):
        with worded(db.path), read_only.begin() as conn:
            conn.execute(text("UPDATE model SET name = 'x'"))
    read_only.dispose()
