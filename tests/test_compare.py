"""Comparing models side by side against real servers: a deployment's base and its adapter, and an external
endpoint whose server is down; the shell's `compare` and the dashboard's compare pane."""

from __future__ import annotations

import json
import os
import re

import pytest

from engine import compare, deployments
from engine.backends import DeploySettings
from engine.errors import EngineError
from tests.test_deployment_adapters import register_adapter
from tests.test_deployments import ready


@pytest.fixture
def served(db, tiny, tmp_path, monkeypatch):
    """'tiny' deployed with the adapter 'alpha' beside it, and 'team': an external endpoint whose server has gone
    away since it was listed."""
    from engine import endpoints
    from tests.test_server import KEY, Server
    from tests.tinymodel import make_tiny_adapter

    register_adapter(db, "alpha", "tiny", make_tiny_adapter(tiny, tmp_path / "alpha", seed=11))
    deployment, _ = deployments.deploy(db, "tiny", DeploySettings(), adapters=["alpha"])
    ready(db, deployment.id)
    gone = Server(tiny, tmp_path, name="tiny")
    monkeypatch.setenv("TEAM_KEY", KEY)
    try:
        endpoints.add(db, "team", gone.url + "/v1", key_env="TEAM_KEY")
    finally:
        gone.stop()
    yield
    deployments.stop(db, "tiny")


def test_one_prompt_to_a_base_its_adapter_and_a_server_that_is_down(db, served):
    import asyncio

    from engine.chat import ChatParams, new_client

    models = compare.contenders(db, ["tiny", "alpha", "team"])
    assert [m.label for m in models] == ["tiny", "alpha", "team"]

    async def two_rounds():
        grown: dict[int, str] = {}
        async with new_client() as client:
            first = await compare.ask_all(client, models, "modeldeck downloads", ChatParams(temperature=0, max_tokens=8),
                                          on_text=lambda i, text, stats: grown.__setitem__(i, text))
            second = await compare.ask_all(client, models, "and then?", ChatParams(temperature=0, max_tokens=8))
        return first, second, grown

    first, second, grown = asyncio.run(two_rounds())
    tiny, alpha, team = first
    assert tiny.error is None and alpha.error is None and tiny.text != alpha.text  # the adapter changes the reply
    assert tiny.stats.tokens == 8 and tiny.stats.ttft_s is not None and tiny.stats.finish == "length"
    assert team.error.startswith("cannot reach http://127.0.0.1:") and team.text == ""
    assert grown[0] == tiny.text and grown[1] == alpha.text  # streamed as it grew
    # a conversation: each model keeps its own replies; the one that failed keeps nothing of the round
    assert [m["content"] for m in models[1].history] == ["modeldeck downloads", alpha.text, "and then?",
                                                          second[1].text]
    assert models[2].history == []


def test_compare_from_the_shell_prints_each_reply_and_json(db, served, tmp_path):
    from tests.test_cli import run

    shown = run("compare", "tiny", "tiny:alpha", "team", "--prompt", "modeldeck downloads", "--max-tokens", "4")
    lines = shown.stdout.splitlines()
    assert lines[0] == "» modeldeck downloads"
    heads = [line for line in lines if line.startswith("── ")]
    assert [h.split(" · ")[0] for h in heads] == ["── tiny", "── tiny:alpha", "── team"]
    assert "4 tokens" in heads[0] and "cut at max tokens" in heads[0]
    assert heads[2].startswith("── team · failed: cannot reach")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"modeldeck downloads"\n{"prompt": "and then?"}\n', encoding="utf-8")
    rounds = json.loads(run("compare", "tiny", "alpha", "--prompts", str(prompts), "--max-tokens", "4",
                            "--json").stdout)
    assert [r["prompt"] for r in rounds] == ["modeldeck downloads", "and then?"]
    assert all(reply["stats"]["tokens"] == 4 and reply["error"] is None for r in rounds for reply in r["replies"])
    alone = json.loads(run("compare", "tiny", "alpha", "--prompt", "and then?", "--max-tokens", "4", "--json").stdout)
    assert [r["reply"] for r in alone[0]["replies"]] == [r["reply"] for r in rounds[1]["replies"]]  # not a dialogue
    # every model down: a failure
    down = run("compare", "team", "team:other", "--prompt", "hi", check=False)
    assert down.returncode == 1 and down.stdout.count("failed: cannot reach") == 2


def test_what_cannot_be_compared_is_refused_by_name(db, served):
    for names, message in [
        (["tiny"], "compare 2 to 4 models; 1 named"),
        (["tiny", "tiny", "alpha", "team", "x"], "compare 2 to 4 models; 5 named"),
        (["tiny", "nothing"], "no deployment or served model named 'nothing'"),
        (["tiny", "tiny:beta"], "'tiny' serves no model 'beta' (it serves tiny, alpha)"),
        (["alpha", "tiny:alpha"], "tiny:alpha and alpha are the same model"),
    ]:  # one deployment for all (it takes seconds to start), not one each
        with pytest.raises(EngineError, match=re.escape(message)):
            compare.contenders(db, names)


def test_a_prompts_file_with_a_bad_line_is_refused_by_its_number(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('"fine"\n{"prompt": "also fine"}\n{"answer": 42}\n', encoding="utf-8")
    with pytest.raises(EngineError, match="p.jsonl, line 3: no prompt"):
        compare.read_prompts(bad)
    bad.write_text('"fine"\n{not json\n', encoding="utf-8")
    with pytest.raises(EngineError, match="p.jsonl, line 2: not valid JSON"):
        compare.read_prompts(bad)
    chats = tmp_path / "chat.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "first"}, {"role": "assistant",
                                                                                     "content": "a"},
                                              {"role": "user", "content": "second"}]}) + "\n"
                     + json.dumps({"instruction": "Sum", "input": "1 2"}) + "\n", encoding="utf-8")
    assert compare.read_prompts(chats) == ["second", "Sum\n\n1 2"]


async def test_the_compare_pane_streams_side_by_side_and_says_why_one_failed(db, served):
    from tests.test_tui import loaded
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.screens.action_menu import ActionMenu  # noqa: F401
    from tui.screens.compare import ComparePicker, CompareScreen, TurnView

    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await loaded(pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: any(d.name == "tiny" for d in app.store.deployments.values()), what="tiny")
        app.screen.focus_row(next(d.id for d in app.store.deployments.values() if d.name == "tiny"))
        await pilot.press("m")
        picker = await wait_for(pilot, lambda: isinstance(app.screen, ComparePicker) and app.screen, what="picker")
        names = [name for name, _ in picker.choices]
        assert names == ["team", "tiny", "tiny:alpha"] and picker.chosen == ["tiny", "tiny:alpha"]
        picker.query_one("#models").select("team")
        await pilot.press("ctrl+s")
        screen = await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen, what="pane")
        await wait_for(pilot, lambda: len(screen.models) == 3, what="the models")
        screen.query_one("#prompt").value = "modeldeck downloads"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not screen._busy and len(screen.query(TurnView)) == 3, 60, what="the replies")
        assert [m.label for m in screen.models] == ["team", "tiny", "tiny:alpha"]  # in the picker's order
        stats = [str(view.query_one(".stats").render()) for view in screen.query(TurnView)]
        assert stats[0].startswith("failed: cannot reach") and "tokens" in stats[1] and "tokens" in stats[2]
        columns = screen.query_one("#columns")
        assert columns.styles.grid_size_columns == 3  # side by side at 120 columns
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert columns.styles.grid_size_columns == 2  # two a row at 80
    os.environ.pop("TEAM_KEY", None)
