"""Adapters on deployments in the dashboard, driven as a user would with a real server: deployed beside their
base from the drawer, one more joining from Custom (s), listed and unloaded in Active deployments (u)."""

from __future__ import annotations

from engine import deployments, models
from tests.test_deployment_adapters import register_adapter
from tests.test_tui import loaded, plain, table
from tests.tui_helpers import wait_for
from tui.app import ModelDeckApp
from tui.screens.action_menu import ActionMenu
from tui.screens.connect_dialog import ConnectDialog
from tui.screens.custom import CustomScreen
from tui.screens.deployments import DeploymentsScreen


async def test_adapters_join_a_deployment_from_the_drawer_and_custom_and_leave_it_from_active(db, tiny_model_dir,
                                                                                           tmp_path):
    from openai import OpenAI

    from tests.tinymodel import make_tiny_adapter
    from tui.screens.deploy_drawer import DeployDrawer
    from tui.screens.details import LiveDetails

    models.import_path(db, tiny_model_dir, "tiny")
    made = {name: register_adapter(db, name, "tiny", make_tiny_adapter(tiny_model_dir, tmp_path / name, seed=30 + i))
            for i, name in enumerate(("alpha", "beta"))}
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("2")
        app.screen.focus_row(next(r.model.id for r in app.store.models.values() if r.model.name == "tiny"))
        await pilot.press("p")
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen, what="the drawer")
        assert "alpha, beta" in drawer.query_one("#adapters").placeholder  # the base's Ready adapters
        drawer.query_one("#adapters").value = "alpha, nothing"
        error = lambda: str(drawer.query_one("#error").render())  # noqa: E731
        await wait_for(pilot, lambda: "no custom model named 'nothing'" in error(), what="the unknown adapter")
        drawer.query_one("#adapters").value = "alpha"
        plan = lambda: str(drawer.query_one("#plan").render())  # noqa: E731
        await wait_for(pilot, lambda: "Serves tiny, and alpha" in plan(), what="the plan")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, DeploymentsScreen), what="Active deployments")
        [deployment] = deployments.deployment_rows(db)
        await wait_for(pilot, lambda: plain(table(app).cells(deployment.id)[3]) == "Ready", 120, what="Ready")
        assert plain(table(app).cells(deployment.id)[0]) == "tiny +1"

        # beta joins it from Custom: s, then the deployment
        await pilot.press("2")
        await wait_for(pilot, lambda: isinstance(app.screen, CustomScreen), what="Custom")
        app.screen.focus_row(made["beta"].id)
        await pilot.press("s")
        menu = await wait_for(pilot, lambda: isinstance(app.screen, ActionMenu) and app.screen, what="the menu")
        assert [str(o.prompt) for o in menu.query_one("OptionList")._options] == [
            "Serve it on tiny: requests name it beta"]
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.store.adapters.get(deployment.id, [])) == 2, 30, what="beta served")
        ready = deployments.deployment_rows(db)[0]
        client = OpenAI(base_url=ready.endpoint, api_key=ready.api_key, max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "alpha", "beta"]
        # served, it reads deployed; its Connect kit names it, not the base
        await wait_for(pilot, lambda: plain(table(app).cells(made["beta"].id)[2]) == "Ready · deployed", what="deployed")
        await pilot.press("c")
        connect = await wait_for(pilot, lambda: isinstance(app.screen, ConnectDialog) and app.screen, what="Connect")
        await wait_for(pilot, lambda: connect.key is not None, what="the key")
        assert connect.model == "beta" and '"model": "beta"' in connect._snippets("k")[0].text
        await pilot.press("escape")
        await pilot.press("3")
        await wait_for(pilot, lambda: plain(table(app).cells(deployment.id)[0]) == "tiny +2", what="+2")
        await pilot.press("d")
        details = await wait_for(pilot, lambda: isinstance(app.screen, LiveDetails) and app.screen, what="details")
        assert dict(details.fields)["Adapters"] == "alpha, beta (u unloads one)"
        assert "--adapter alpha=" in dict(details.fields)["Command"]
        await pilot.press("escape")

        # u: unload one; it leaves the server and the row
        await pilot.press("u")
        menu = await wait_for(pilot, lambda: isinstance(app.screen, ActionMenu) and app.screen, what="the menu")
        assert [str(o.prompt).split("  ")[0] for o in menu.query_one("OptionList")._options] == ["alpha", "beta"]
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: plain(table(app).cells(deployment.id)[0]) == "tiny +1", 30, what="unloaded")
        assert [m.id for m in client.models.list()] == ["tiny", "alpha"]
    deployments.stop(db, deployment.id)
