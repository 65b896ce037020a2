"""Deployments with the real built-in server: a supervising job process, the server as its child, the
state moving Pending → Ready, the official openai SDK against the endpoint, failure, stop and cleanup."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time

import psutil
import pytest

from catalog.schema import Deployment, DeploymentState, JobState
from engine import deployments, jobs, models
from engine.backends import DeploySettings, free_port, port_free
from engine.errors import EngineError
from tests.conftest import deployment_now, wait_until

row = deployment_now


def ready(db, deployment_id, timeout=120, expected=DeploymentState.READY) -> Deployment:
    def settled():
        d = row(db, deployment_id)
        return d if d.state != DeploymentState.PENDING else None

    done = wait_until(settled, timeout, 0.2, "the deployment to leave Pending")
    assert done.state == expected, (done.reason, jobs.log_tail(jobs.get(db, done.job_id).log_path, 20))
    return done


def server_process(db, deployment) -> psutil.Process:
    return psutil.Process(jobs.get(db, deployment.job_id).pid).children()[0]


def test_deploy_serves_the_model_to_the_openai_sdk_then_stops_and_frees_the_port(db, tiny):
    from openai import AuthenticationError, OpenAI

    deployment, job = deployments.deploy(db, "tiny", DeploySettings(backend="transformers"))
    assert deployment.state == DeploymentState.PENDING and deployment.phase == "starting"
    assert deployment.api_key.startswith("sk-md-") and deployment.endpoint.startswith("http://127.0.0.1:")
    done = ready(db, deployment.id)
    assert done.phase is None and done.backend == "transformers" and done.gpus == "cpu"
    client = OpenAI(base_url=done.endpoint, api_key=done.api_key, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0)
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=done.endpoint, api_key="wrong", max_retries=0).models.list()
    port = int(done.endpoint.rsplit(":", 1)[1].split("/")[0])
    server = server_process(db, done)

    stopped = deployments.stop(db, "tiny")
    assert stopped.state == DeploymentState.STOPPED
    assert jobs.get(db, job.id).state == JobState.CANCELLED
    wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 10, what="the server to end")
    assert port_free("127.0.0.1", port)
    deployments.delete(db, "tiny")
    assert deployments.deployment_rows(db) == []


def test_a_killed_server_turns_the_deployment_failed_within_5_seconds(db, tiny):
    deployment, _ = deployments.deploy(db, "tiny", DeploySettings())
    done = ready(db, deployment.id)
    os.kill(server_process(db, done).pid, signal.SIGKILL)
    killed_at = time.monotonic()
    failed = wait_until(lambda: (d := row(db, deployment.id)).state == DeploymentState.FAILED and d, 10,
                        what="Failed")
    assert time.monotonic() - killed_at < 5
    assert failed.reason == "the server was killed by signal SIGKILL"
    with pytest.raises(EngineError, match="already failed"):
        deployments.stop(db, deployment.name)


def test_two_deployments_at_once_and_a_port_in_use_is_refused(db, tiny):
    port = free_port()
    first, _ = deployments.deploy(db, "tiny", DeploySettings(port=port), name="one")
    with pytest.raises(EngineError, match=f"port {port} is kept for deployment 'one'"):  # loading: nothing listens yet
        deployments.deploy(db, "tiny", DeploySettings(port=port), name="two")
    second, _ = deployments.deploy(db, "tiny", DeploySettings(), name="two")
    assert first.endpoint != second.endpoint
    assert ready(db, first.id).state == ready(db, second.id).state == DeploymentState.READY
    with pytest.raises(EngineError, match="already running"):
        deployments.deploy(db, "tiny", DeploySettings(), name="one")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(EngineError, match=f"port {taken.getsockname()[1]} on 127.0.0.1 is in use"):
            deployments.deploy(db, "tiny", DeploySettings(port=taken.getsockname()[1]), name="three")
    with pytest.raises(EngineError, match="is ready; stop it first"):
        deployments.delete(db, "one")
    for name in ("one", "two"):
        deployments.stop(db, name)


def test_a_stopped_deployment_starts_again_with_its_name_port_key_and_chats(db, tiny):
    from openai import OpenAI
    from sqlmodel import select

    from catalog.schema import Conversation

    first, _ = deployments.deploy(db, "tiny", DeploySettings(), name="again")
    first = ready(db, first.id)
    with db.write() as session:
        session.add(Conversation(deployment_id=first.id, title="kept"))
    deployments.stop(db, "again")
    with pytest.raises(EngineError, match="a stopped deployment named 'again' exists: `modeldeck start again`"):
        deployments.deploy(db, "tiny", DeploySettings(), name="again")  # one row per name: not a second one

    second, _ = deployments.restart(db, "again")
    second = ready(db, second.id)
    assert (second.name, second.endpoint, second.api_key) == ("again", first.endpoint, first.api_key)
    assert [d.id for d in deployments.deployment_rows(db)] == [second.id]
    with db.read() as session:
        assert [c.title for c in session.exec(select(Conversation).where(Conversation.deployment_id == second.id))] \
            == ["kept"]
    reply = OpenAI(base_url=second.endpoint, api_key=first.api_key, max_retries=0).completions.create(
        model="tiny", prompt="hi", max_tokens=2, temperature=0)  # a client's old key still works
    assert reply.usage.completion_tokens >= 1
    with pytest.raises(EngineError, match="is ready already"):
        deployments.restart(db, "again")
    deployments.stop(db, "again")

    with socket.socket() as taken:  # its port taken meanwhile: it starts on another, and says so
        port = int(second.endpoint.rsplit(":", 1)[1].split("/")[0])
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the server's closed connections
        taken.bind(("127.0.0.1", port))
        taken.listen()
        checked = deployments.replan(db, "again")
        assert checked.settings.port != port and f"port {port} is taken now" in " ".join(checked.warnings)
    replaced, _ = deployments.deploy(db, "tiny", DeploySettings(), name="again", replace=True)
    assert [d.id for d in deployments.deployment_rows(db)] == [replaced.id] and replaced.api_key != first.api_key
    deployments.stop(db, "again")


def test_a_supervisor_killed_takes_its_server_with_it(db, tiny):
    deployment, job = deployments.deploy(db, "tiny", DeploySettings(), name="orphan-check")
    done = ready(db, deployment.id)
    server = server_process(db, done)
    os.kill(jobs.get(db, job.id).pid, signal.SIGKILL)
    failed = wait_until(lambda: (d := row(db, deployment.id)).state == DeploymentState.FAILED and d, 15, what="Failed")
    assert "supervisor stopped" in failed.reason
    wait_until(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 10, what="no orphan")


def test_what_cannot_be_deployed_is_refused_with_the_reason(db, tiny, tmp_path):
    with pytest.raises(EngineError, match="no custom model named 'nope'"):
        deployments.deploy(db, "nope", DeploySettings())
    with pytest.raises(EngineError, match="no GPU 3 on this machine"):
        deployments.deploy(db, "tiny", DeploySettings(gpus="3"))
    with pytest.raises(EngineError, match="Tensor parallel must be 1 or more"):
        deployments.deploy(db, "tiny", DeploySettings(tensor_parallel=0))
    with pytest.raises(EngineError, match="vLLM needs a CUDA GPU"):
        deployments.deploy(db, "tiny", DeploySettings(backend="vllm"))
    assert deployments.deployment_rows(db) == [] and free_port()


def test_the_plan_checks_the_fit_and_warns_of_an_exposed_address(db, tiny):
    checked = deployments.plan(db, "tiny", DeploySettings(host="0.0.0.0"))
    assert checked.backend == "transformers" and checked.gpus == "cpu" and checked.settings.port > 0
    assert checked.fit.where == "RAM" and checked.fit.verdict == "fits" and checked.fit.needed.total > 0
    assert "weights" in checked.fit.describe() and "KV cache" in checked.fit.describe()
    assert any("0.0.0.0 is reachable from other machines" in w for w in checked.warnings)
    assert deployments.plan(db, "tiny", DeploySettings()).warnings == []
    with pytest.raises(EngineError, match="tensor parallel needs vLLM"):
        deployments.plan(db, "tiny", DeploySettings(tensor_parallel=2))


def test_a_model_that_does_not_fit_is_refused_unless_forced(db, tiny):

    with db.write() as session:  # as if its weights were 100 TB: no machine has that much RAM free
        model = models.find_model(session, "tiny")
        model.size_bytes = 100 * 2**40
        session.add(model)
    with pytest.raises(EngineError, match=r"tiny does not fit: it needs about .* free RAM .*override the check"):
        deployments.deploy(db, "tiny", DeploySettings())
    assert deployments.deployment_rows(db) == []
    deployment, _ = deployments.deploy(db, "tiny", DeploySettings(), force=True)
    assert ready(db, deployment.id).state == DeploymentState.READY  # the estimate was wrong; the override won
    deployments.stop(db, deployment.id)


def test_a_model_deployed_while_it_downloads_is_served_once_it_is_ready(db, tiny_model_dir, monkeypatch):
    from openai import OpenAI

    from tests.hubserver import HubServer, Repo

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    hub = HubServer({"org/tiny-llama": Repo(files)}, bytes_per_second=sum(map(len, files.values())) / 3).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        model, _ = models.pull(db, "org/tiny-llama")
        checked = deployments.plan(db, model.name, DeploySettings())
        assert checked.fit.rough and any("still downloading" in w for w in checked.warnings)
        deployment, _ = deployments.deploy(db, model.name, DeploySettings())
        assert deployment.phase == "waiting for the download"
        done = ready(db, deployment.id)
        assert done.state == DeploymentState.READY, done.reason
        client = OpenAI(base_url=done.endpoint, api_key=done.api_key)
        reply = client.completions.create(model=done.served_name, prompt="hi", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens >= 1
        deployments.stop(db, deployment.id)
    finally:
        hub.stop()


def test_leftovers_of_a_dead_job_are_killed_only_when_they_carry_its_tag():
    import subprocess
    import sys

    from engine.jobs import JOB_TAG, kill_leftovers

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleeper, start_new_session=True, env=os.environ | {JOB_TAG: "db#7"})
    stranger = subprocess.Popen(sleeper, start_new_session=True, env=os.environ | {JOB_TAG: "db#8"})
    try:
        wait_until(lambda: psutil.Process(ours.pid).environ().get(JOB_TAG), 5, what="the child's environment")
        kill_leftovers("db#7")  # its own tag only: not another job's, wherever it runs
        assert ours.wait(timeout=5) == -signal.SIGKILL
        assert stranger.poll() is None
    finally:
        stranger.kill()
        ours.kill()
        stranger.wait()


def test_a_server_that_crashes_while_loading_fails_with_the_reason_from_its_log(db, tmp_path):
    import shutil

    from tests.tinymodel import make_tiny_llama

    broken = make_tiny_llama(tmp_path / "broken")
    models.import_path(db, broken, "broken")
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # damaged after the import
    deployment, job = deployments.deploy(db, "broken", DeploySettings())
    failed = ready(db, deployment.id, expected=DeploymentState.FAILED)
    assert failed.reason.startswith("the server exited with code 1: ") and "Error" in failed.reason
    assert "\n" not in failed.reason and "^^^" not in failed.reason and len(failed.reason) < 500
    wait_until(lambda: jobs.get(db, job.id).state != JobState.RUNNING, 15, what="the supervisor to end")
    shutil.rmtree(broken)



@pytest.mark.parametrize("lines, reason", [
    (["Loading weights: 100%|██████████| 30/30", "09:00:09 ready at http://127.0.0.1:8001/v1"], ""),
    (["Traceback (most recent call last):", '  File "x.py", line 1', "torch.OutOfMemoryError: CUDA out of memory."],
     "torch.OutOfMemoryError: CUDA out of memory."),
    (["INFO loading", "ERROR: [Errno 98] address already in use", "shutting down"],
     "ERROR: [Errno 98] address already in use"),
    (["step 3/10", "Killed"], "Killed"),
    ([], ""),
])
def test_a_failure_reason_quotes_only_a_line_that_says_what_went_wrong(lines, reason):
    from engine.logs import tail_reason

    assert tail_reason(lines) == reason


def test_a_deployment_on_a_cluster_is_asked_for_again_without_what_its_target_filled_in():
    from engine import targets

    for spec, filled in (("slurm:gpu", {"host": "0.0.0.0", "port": 0}), ("ctx/ml", {"backend": "vllm", "port": 8000})):
        stored = dataclasses.asdict(DeploySettings(target=spec, max_model_len=4096, options={"time": "1:00:00"})) | filled
        asked = deployments.asked_settings(stored)
        assert asked.max_model_len == 4096 and asked.options == {"time": "1:00:00"} and asked.target == spec
        deployments._refuse_what_it_does_not_use(targets.resolve(spec), asked)  # what plan() checks first
