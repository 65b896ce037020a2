"""The layers import in one direction, and the dashboard never pays for the heavy libraries."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "vllm", "kubernetes")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_engine_and_catalog_never_import_textual_or_tui():
    modules = imported_after(
        "import catalog, catalog.curated, engine, engine.models, engine.jobs, engine.jobs.harness, "
        "engine.jobs.download, engine.jobs.importer, engine.hub, engine.mirrors, engine.community, engine.deployments"
    )
    assert "textual" not in modules
    assert "tui" not in modules


def test_catalog_never_imports_engine():
    assert "engine" not in imported_after("import catalog, catalog.curated, catalog.schema, catalog.migrations")


def test_dashboard_and_cli_never_import_heavy_libraries():
    modules = imported_after(
        "import tui.cli, tui.app, tui.screens.custom, tui.screens.community, tui.screens.deployments"
    )
    assert "textual" in modules  # the probe really loaded the dashboard
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_the_dashboard_paints_before_loading_the_database_layer():
    """SQLAlchemy and SQLModel take ~0.4 s to import: the app imports them in its worker, after the
    first frame, which is what keeps cold start to first paint under half a second."""
    modules = imported_after("import tui.cli, tui.app")
    assert not modules & {"sqlalchemy", "sqlmodel", "psutil", "huggingface_hub"}
