"""The `modeldeck` command as a user runs it: real subprocesses, exit codes, tables and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True,
                            env=dict(os.environ), input=stdin, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_catalog_lists_filters_and_prints_json():
    everything = json.loads(run("catalog", "--json").stdout)
    assert len(everything) >= 30
    code = json.loads(run("catalog", "--json", "--tag", "code", "qwen").stdout)
    assert code and all("code" in m["tags"] and "qwen" in (m["name"] + m["repo_id"]).lower() for m in code)
    table = run("catalog", "--tag", "embedding").stdout
    assert table.splitlines()[0].split()[:2] == ["REPO", "ID"] and "BAAI/bge-m3" in table


def test_pull_wait_ls_show_rm_round_trip(hub):
    pulled = run("pull", "org/tiny", "--wait", "--json")
    model = json.loads(pulled.stdout)
    assert model["state"] == "ready" and model["repo_id"] == "org/tiny"
    listed = json.loads(run("ls", "--json").stdout)
    assert [m["name"] for m in listed] == ["tiny"]
    assert "tiny" in run("ls").stdout and "Ready" in run("ls").stdout
    shown = json.loads(run("show", "tiny", "--json").stdout)
    assert shown["path"].endswith(shown["revision"])
    jobs = json.loads(run("jobs", "--json").stdout)
    assert jobs[0]["kind"] == "download" and jobs[0]["state"] == "succeeded"
    refused = run("rm", "tiny", check=False)  # no terminal to confirm on
    assert refused.returncode == 1 and "without --yes" in refused.stderr
    removed = json.loads(run("rm", "tiny", "--yes", "--json").stdout)
    assert removed["deleted"] == "tiny" and removed["freed_bytes"] > 0
    assert json.loads(run("ls", "--json").stdout) == []


def test_pull_wait_exits_non_zero_with_the_reason_when_it_fails(hub):
    result = run("pull", "org/gated", "--wait", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "is gated" in result.stderr


@pytest.mark.parametrize("args, message", [
    (("show", "nothing"), "no custom model named 'nothing'"),
    (("pull", "not-a-repo"), "invalid repo id"),
    (("import", "/no/such/path"), "no such folder"),
    (("import", ""), "give the path of a model folder"),
    (("rm", "ghost", "--yes"), "no custom model named 'ghost'"),
    (("cancel", "42"), "no job 42"),
])
def test_errors_are_one_line_with_a_non_zero_exit(args, message):
    result = run(*args, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("modeldeck: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_import_folder_from_the_shell(tiny_model_dir):
    out = run("import", str(tiny_model_dir), "--name", "local-tiny")
    assert out.stdout.strip() == "local-tiny: ready"
    assert json.loads(run("show", "local-tiny", "--json").stdout)["source"] == f"import:{tiny_model_dir}"


def test_a_bad_home_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MODELDECK_HOME", str(blocker / "home"))
    result = run("ls", check=False)
    assert result.returncode == 1 and "cannot create modeldeck home" in result.stderr


def test_gpus_says_there_is_none_here_and_prints_an_empty_json_list():
    from engine.gpus import list_gpus

    if list_gpus():
        listed = json.loads(run("gpus", "--json").stdout)
        assert listed and all(g["memory_total_mb"] > 0 and "holders" in g for g in listed)
        assert run("gpus").stdout.splitlines()[0].split()[:3] == ["GPU", "NAME", "UTIL"]
        return
    assert run("gpus").stdout == "no NVIDIA GPU here (NVML finds no driver): work on this machine runs on the CPU\n"
    assert json.loads(run("gpus", "--json").stdout) == []


def test_an_unknown_tag_is_an_error_that_lists_the_tags():
    result = run("catalog", "--tag", "nonsense", check=False)
    assert result.returncode == 1 and "unknown tag nonsense; tags: chat," in result.stderr


def test_output_into_a_closed_pipe_is_not_an_error():
    result = subprocess.run(f"{sys.executable} -m tui.cli catalog | head -n 1", shell=True, capture_output=True,
                            text=True, env=dict(os.environ), timeout=60)
    assert result.stdout.startswith("REPO ID") and "Traceback" not in result.stderr


def test_rm_refuses_a_model_with_dependents_before_asking(tiny_model_dir, db):
    from catalog.schema import Model, ModelKind, ModelState
    from engine import models

    base, _ = models.import_path(db, tiny_model_dir, "base")
    with db.write() as session:
        session.add(Model(name="lora", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune",
                          base_id=base.id))
    result = run("rm", "base", check=False)
    assert result.returncode == 1 and "adapter 'lora' is built on it" in result.stderr


def test_logs_prints_and_follows_a_jobs_log(hub):
    hub.bytes_per_second = 10_000_000
    started = json.loads(run("pull", "org/big", "--json").stdout)
    job_id = started["job"]["id"]
    followed = run("logs", str(job_id), "-f")  # returns when the job has ended
    assert "started: download org/big" in followed.stdout and "job succeeded" in followed.stdout
    as_json = json.loads(run("logs", str(job_id), "--json").stdout)
    assert as_json["job"] == job_id and as_json["lines"][-1].endswith("job succeeded")


def test_finetune_merge_logs_and_retry_from_the_shell(tmp_path, tiny_model_dir):
    from tests.tinydata import write_dataset, write_jsonl

    run("import", str(tiny_model_dir), "--name", "tiny")
    data = write_dataset(tmp_path, "alpaca")
    tuned = run("finetune", "tiny", str(data), "--name", "tuned", "--max-steps", "2", "--lr", "0.01",
                "--batch-size", "4", "--grad-accum", "1", "--wait", "--json")
    adapter = json.loads(tuned.stdout)
    assert adapter["state"] == "ready" and adapter["kind"] == "adapter" and adapter["base"] == "tiny"
    assert adapter["meta"]["format"] == "Alpaca" and adapter["meta"]["hyperparameters"]["rank"] == 16
    shown = run("show", "tuned").stdout
    assert "hyperparameters: alpha=32" in shown and "final loss:" in shown
    assert "step 2/2" in run("logs", "tuned").stdout
    merged = json.loads(run("merge", "tuned", "--wait", "--json").stdout)
    assert merged["state"] == "ready" and merged["kind"] == "merged" and merged["name"] == "tuned-merged"
    jobs = json.loads(run("jobs", "--json").stdout)
    assert [j["kind"] for j in jobs[:2]] == ["merge", "finetune"] and jobs[1]["metrics"]["step"] == 2

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine"}, "not an object"])
    refused = run("finetune", "tiny", str(bad), check=False)
    assert refused.returncode == 1 and "bad.jsonl, line 3: not a JSON object" in refused.stderr
    refused = run("finetune", "tiny", str(data), "--rank", "0", "--lr", "2", check=False)
    assert refused.returncode == 1 and "LoRA rank must be above 0" in refused.stderr and "far too high" in refused.stderr
    refused = run("finetune", "tiny", str(data), "--gpus", "3", check=False)
    assert refused.returncode == 1 and "no GPU 3 on this machine" in refused.stderr
    refused = run("retry", "tuned", check=False)
    assert refused.returncode == 1 and "only a failed model can be retried" in refused.stderr


def test_deploy_ps_logs_stop_from_the_shell(tiny_model_dir):
    run("import", str(tiny_model_dir), "--name", "tiny")
    deployed = json.loads(run("deploy", "tiny", "--wait", "--json").stdout)
    assert deployed["state"] == "ready" and deployed["backend"] == "transformers"
    assert deployed["endpoint"].startswith("http://127.0.0.1:") and deployed["api_key"].startswith("sk-md-")
    from openai import OpenAI

    reply = OpenAI(base_url=deployed["endpoint"], api_key=deployed["api_key"], max_retries=0).completions.create(
        model="tiny", prompt="hello", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1
    listed = run("ps").stdout
    assert "tiny" in listed and "Ready" in listed and deployed["endpoint"] in listed
    assert "Ready · deployed" in run("ls").stdout  # as the dashboard says it
    assert "ready at" in run("logs", "tiny").stdout  # the deployment's server log, by its name
    # One streamed reply, its numbers on stderr. Greedy: sampled, this random model may end at once.
    chatted = run("chat", "tiny", "hello", "--max-tokens", "3", "--temperature", "0")
    assert "3 tokens · cut at max tokens" in chatted.stderr  # (a random model's 3 tokens may print nothing)
    piped = run("chat", "tiny", "-", "--temperature", "0", "--json", stdin="hello from stdin")
    answer = json.loads(piped.stdout)  # with --json, one object on stdout: the reply and its numbers
    assert answer["deployment"] == "tiny" and answer["stats"]["tokens"] >= 1 and isinstance(answer["reply"], str)
    assert "Temperature: 'hot' is not a number" in run("chat", "tiny", "hi", "--temperature", "hot",
                                                       check=False).stderr
    # The same server, listed as an external endpoint whose key lives in an environment variable.
    os.environ["TEAM_KEY"] = deployed["api_key"]
    try:
        added = run("endpoint", "add", "team", deployed["endpoint"], "--key-env", "TEAM_KEY").stdout
        assert "team: ready at" in added and "(model tiny)" in added
        assert "tokens" in run("chat", "team", "hi", "--max-tokens", "2").stderr
        assert "external" in run("ps").stdout
        assert "team: removed" in run("endpoint", "rm", "team").stdout
    finally:
        del os.environ["TEAM_KEY"]
    jobs_table = run("jobs").stdout.splitlines()
    serving = next(line for line in jobs_table if " serve " in line)
    assert "deployment tiny" in serving and "Ready" in serving and "warming up" not in serving
    refused = run("cancel", "tiny", check=False)  # a live deployment is stopped with `stop`, not cancelled
    assert refused.returncode == 1 and "serves the deployment 'tiny': stop it with `modeldeck stop tiny`" in refused.stderr
    blocked = run("rm", "tiny", "--yes", check=False)
    assert blocked.returncode == 1 and "deployment 'tiny' serves it: stop it first" in blocked.stderr
    assert "tiny: stopped" in run("stop", "tiny").stdout
    refused = run("stop", "tiny", check=False)
    assert refused.returncode == 1 and "already stopped" in refused.stderr
    again = json.loads(run("start", "tiny", "--wait", "--json").stdout)  # its settings, name and key
    assert again["state"] == "ready" and again["api_key"] == deployed["api_key"]
    assert [d["name"] for d in json.loads(run("ps", "--json").stdout)] == ["tiny"]
    assert "tiny: stopped" in run("stop", "tiny").stdout
    refused = run("deploy", "tiny", check=False)  # one deployment per name: asked, not a second row
    assert refused.returncode == 1 and "`modeldeck start tiny` starts it again" in refused.stderr
    removed = run("rm", "tiny", "--yes").stdout  # its stopped deployment goes with it, and it says so
    assert "with it its ended deployment tiny and their chats" in removed
    assert json.loads(run("ps", "--json").stdout) == []


def test_adapters_join_and_leave_a_deployment_from_the_shell(tiny_model_dir, db, tmp_path):
    from tests.test_deployment_adapters import register_adapter
    from tests.tinymodel import make_tiny_adapter

    run("import", str(tiny_model_dir), "--name", "tiny")
    for i, name in enumerate(("alpha", "beta")):
        register_adapter(db, name, "tiny", make_tiny_adapter(tiny_model_dir, tmp_path / name, seed=20 + i))
    deployed = json.loads(run("deploy", "tiny", "--adapter", "alpha", "--wait", "--json").stdout)
    assert deployed["state"] == "ready" and deployed["adapters"] == ["alpha"]
    said = run("serve-adapter", "beta", "tiny", "--as", "b2")
    assert said.stdout.strip() == "tiny: serves beta as 'b2'"
    listed = run("ps").stdout.splitlines()
    assert "ADAPTERS" in listed[0] and "alpha, b2" in listed[1]
    assert [d["adapters"] for d in json.loads(run("ps", "--json").stdout)] == [["alpha", "b2"]]
    refused = run("serve-adapter", "alpha", "tiny", check=False)
    assert refused.returncode == 1 and "'alpha' is served on 'tiny' already (as 'alpha')" in refused.stderr
    blocked = run("rm", "beta", "--yes", check=False)
    assert blocked.returncode == 1 and "'tiny' serves it beside its base: unload it first" in blocked.stderr
    assert run("unserve-adapter", "b2", "tiny").stdout.strip() == "tiny: no longer serves 'b2'"
    refused = run("unserve-adapter", "b2", "tiny", check=False)
    assert refused.returncode == 1 and "serves no adapter 'b2' (it serves 'alpha')" in refused.stderr
    assert "tiny: stopped" in run("stop", "tiny").stdout
