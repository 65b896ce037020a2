"""Settings: the environment and the config file read in one place; the user's own keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from catalog import CatalogError
from catalog.settings import current


@pytest.fixture
def config(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    monkeypatch.setenv("MODELDECK_CONFIG", str(path))
    for variable in ("MODELDECK_SLURM", "MODELDECK_SLURM_WORKDIR", "MODELDECK_VLLM_IMAGE", "MODELDECK_FINETUNE_IMAGE"):
        monkeypatch.delenv(variable, raising=False)
    return path


def test_the_file_gives_settings_and_a_variable_wins_over_it(config, monkeypatch):
    with pytest.raises(CatalogError, match="MODELDECK_CONFIG names .*config.toml, which does not exist"):
        current()
    monkeypatch.delenv("MODELDECK_CONFIG")  # the platform's place, where there is none (the tests' own)
    assert current().vllm_image == "" and current().slurm_enabled and current().config_path is None
    monkeypatch.setenv("MODELDECK_CONFIG", str(config))
    config.write_text(textwrap.dedent("""
        [slurm]
        enabled = false
        workdir = "/scratch/me"
        [kubernetes]
        vllm_image = " registry/vllm:1 "
        [keys]
        "custom.deploy" = "P"
    """))
    settings = current()
    assert (settings.slurm_enabled, settings.slurm_workdir, settings.vllm_image) == (False, "/scratch/me", "registry/vllm:1")
    assert settings.keys == {"custom.deploy": "P"} and settings.config_path == config
    monkeypatch.setenv("MODELDECK_VLLM_IMAGE", "mine:2")
    monkeypatch.setenv("MODELDECK_SLURM", "on")
    assert current().vllm_image == "mine:2" and current().slurm_enabled  # read again: a variable changed
    config.write_text('[kubernetes]\nfinetune_image = "train:3"\n')
    os.utime(config, ns=(1, 1))  # a different stamp, whatever the clock's resolution
    assert current().finetune_image == "train:3" and current().slurm_workdir == ""  # the file changed


@pytest.mark.parametrize("text, message", [
    ("hme = 'x'", "unknown setting 'hme'"),
    ("[slurm]\nworkdr = 'x'", "unknown setting slurm.workdr"),
    ("[kubernetes]\nvllm_image = 3", "kubernetes.vllm_image must be a string"),
    ("[keys]\n'app.quit' = 5", "[keys] maps a binding's id to its keys"),
    ("home = ", "is not valid TOML"),
])
def test_a_bad_config_file_is_one_line_naming_what_is_wrong(config, text, message):
    config.write_text(text)
    with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]")):
        current()


def test_the_cli_says_what_is_wrong_with_the_config_file_in_one_line(config, isolated):
    config.write_text("[slurm]\nworkdr = '/x'\n")
    ran = subprocess.run([sys.executable, "-m", "tui.cli", "ls"], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and ran.stderr.strip().count("\n") == 0
    assert f"the config file {config}: unknown setting slurm.workdr" in ran.stderr


async def test_keys_of_the_config_file_replace_the_defaults_and_help_shows_them(db, config, tiny_model_dir):
    from engine import models
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.screens.deploy_drawer import DeployDrawer
    from tui.screens.help import HelpDialog

    models.import_path(db, tiny_model_dir, "tiny")
    config.write_text('[keys]\n"custom.deploy" = "P"\n"custom.nonsense" = "z"\n')
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded, what="first load")
        await wait_for(pilot, lambda: any("custom.nonsense" in str(n.message) for n in app._notifications),
                       what="the typo to be said (after the first paint, which a busy machine may put after the load)")
        await pilot.press("2")
        await wait_for(pilot, lambda: app.screen.query_one("#table").row_count == 1)
        await pilot.press("p")
        await pilot.pause()
        assert not isinstance(app.screen, DeployDrawer)  # p is no longer deploy
        await pilot.press("P")
        await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer), what="P to deploy")
        await pilot.press("escape")
        await pilot.press("question_mark")
        help_dialog = await wait_for(pilot, lambda: isinstance(app.screen, HelpDialog) and app.screen)
        await pilot.pause()
        from rich.console import Console

        console = Console(width=160, record=True, file=open(os.devnull, "w"))
        console.print(help_dialog.query_one(".dialog-scroll Static").content)
        deploy_line = next(line for line in console.export_text().splitlines() if "custom.deploy" in line)
        assert deploy_line.split()[0] == "P"  # the key it has now, beside the id to change it by
