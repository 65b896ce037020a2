"""The SLURM target against a real single-node cluster (tests/slurmcluster.py: munged, slurmctld and slurmd,
two CPUs and two stand-in GPUs, no accounting): fine-tunes and deployments as real batch jobs, followed
through the real squeue, stopped with the real scancel; the queue's own reasons; a time limit; a supervisor
killed and a new dashboard; the controller down for a while. The SLURM language itself (times, memory,
GPUs, states, reasons) is checked on its own below, without a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog.schema import Deployment, DeploymentState, JobState, Model, ModelState
from engine import deployments, finetune, jobs, models
from engine.backends import DeploySettings
from engine.errors import EngineError
from engine.hyperparameters import Hyperparameters
from tests.conftest import FAST, deployment_now, settled, wait_until
from tests.tinydata import write_dataset

deployment = deployment_now


def deployment_where(db, deployment_id, predicate, timeout=90, what="") -> Deployment:
    return wait_until(lambda: d if predicate(d := deployment(db, deployment_id)) else None, timeout, 0.2,
                      what or "the deployment")


def job_log(db, job_id) -> str:
    return Path(jobs.get(db, job_id).log_path).read_text(errors="replace")


def metrics(db, job_id) -> dict:
    return json.loads(jobs.get(db, job_id).metrics_json or "{}")


# -- fine-tunes and deployments as batch jobs ------------------------------------------------------------


def test_a_finetune_runs_as_a_batch_job_to_ready_with_its_loss_curve(db, slurm, tiny, tmp_path):
    checked = finetune.plan(db, "tiny", write_dataset(tmp_path, "openai"), Hyperparameters(max_steps=6, **FAST), "0",
                            target="slurm:debug", options={"time": "5"})
    assert "6 steps on CPU in a batch job on the SLURM partition debug for up to 00:05:00" in checked.summary()
    model, job = finetune.start(db, checked, "tiny-on-slurm")
    assert model.meta["slurm"]["target"] == "slurm:debug"
    done = settled(db, model.id, 180)
    assert done.state == ModelState.READY, (done.reason, job_log(db, job.id)[-3000:])
    curve = metrics(db, job.id)["curve"]["train"]
    assert [step for step, _ in curve][-1] == 6 and all(loss > 0 for _, loss in curve)
    assert done.meta["steps"] == 6 and done.size_bytes > 0
    workdir = Path(os.environ["MODELDECK_HOME"]) / "slurm"
    assert Path(done.path) == workdir / "models" / "tiny-on-slurm" and (Path(done.path) / "adapter_config.json").exists()
    run = Path(done.meta["slurm"]["run"])
    script = (run / "attempt-1.sh").read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --time=00:05:00" in script
    assert "#SBATCH --signal=B:USR1@75" in script  # a checkpoint a quarter of its time before the limit
    said = job_log(db, job.id)
    assert "submitted batch job" in said and "step 6/6" in said and "@modeldeck" not in said
    assert slurm.queue() == []  # nothing left queued or running
    assert models.delete_plan(db, "tiny-on-slurm").frees_bytes == done.size_bytes
    models.delete_model(db, "tiny-on-slurm")  # the adapter and its run's folder go
    assert not Path(done.path).exists() and not run.exists()


def test_a_deployment_serves_from_a_batch_job_to_the_openai_sdk_and_stops_leaving_nothing_queued(db, slurm, tiny):
    from openai import OpenAI

    started, job = deployments.deploy(db, "tiny", DeploySettings(target="slurm:debug", gpus="0", options={"time": "5"}))
    assert started.endpoint is None and started.phase == "submitting its batch job"  # its node says where, later
    done = deployment_where(db, started.id, lambda d: d.state != DeploymentState.PENDING, what="Ready")
    assert done.state == DeploymentState.READY, (done.reason, job_log(db, job.id)[-2000:])
    assert done.endpoint.startswith(f"http://{slurm.node}:") and done.backend == "transformers"
    assert time.time() < done.ends_at <= time.time() + 300  # its batch job's time limit
    client = OpenAI(base_url=done.endpoint, api_key=done.api_key, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0)
    assert reply.usage.completion_tokens >= 1
    [batch_job] = slurm.queue()
    assert metrics(db, job.id)["slurm_job"] == batch_job
    script = (Path(metrics(db, job.id)["slurm_run"]) / "attempt-1.sh").read_text()
    assert done.api_key not in script and "engine.targets.slurm.launch" in script  # the key went by sbatch's env
    stopped = deployments.stop(db, done.id)
    assert stopped.state == DeploymentState.STOPPED and jobs.get(db, job.id).state == JobState.CANCELLED
    assert slurm.queue() == []  # cancelled, and gone from its node before stop returned
    run = Path(metrics(db, job.id)["slurm_run"])
    deployments.delete(db, stopped.id)
    assert not run.exists()  # its folder in the work directory goes with its record


def test_a_job_waiting_for_gpus_says_so_then_runs_with_them_and_a_scancel_from_outside_says_why(db, slurm, tiny):
    holder = slurm.command("sbatch", "--parsable", "--partition=gpu", "--gres=gpu:2", "--time=5", "--output=/dev/null",
                           "--wrap", "sleep 300").strip()
    started, job = deployments.deploy(db, "tiny", DeploySettings(target="slurm:gpu", gpus="1", backend="transformers",
                                                                 options={"time": "5"}))
    waiting = deployment_where(db, started.id, lambda d: "GPU" in (d.phase or ""), 30, "the queue's reason")
    assert waiting.phase == f"waiting for GPUs (batch job {metrics(db, job.id)['slurm_job']})"
    slurm.command("scancel", holder)
    done = deployment_where(db, started.id, lambda d: d.state != DeploymentState.PENDING, what="Ready")
    assert done.state == DeploymentState.READY, done.reason
    assert "GPUs 0" in job_log(db, job.id)  # SLURM gave the job its GPU (CUDA_VISIBLE_DEVICES), as on real ones
    [batch_job] = slurm.queue()
    slurm.command("scancel", batch_job)  # from outside modeldeck
    failed = deployment_where(db, started.id, lambda d: d.state != DeploymentState.READY, 30, "Failed")
    assert (failed.state, failed.reason) == (DeploymentState.FAILED,
                                             "its batch job was cancelled outside modeldeck (scancel)")


def test_a_finetune_stopped_by_its_time_limit_fails_saying_so_and_resumes_from_its_checkpoint(db, slurm, tiny, tmp_path):
    """SIGUSR1 a quarter of its minute before the limit saves a checkpoint; the limit stops the run; a retry
    resumes from it. (SLURM's shortest limit is a minute, checked every 30 s: this test takes 1-2 minutes.)"""
    checked = finetune.plan(db, "tiny", write_dataset(tmp_path, "text"), Hyperparameters(max_steps=1_000_000, **FAST),
                            "0", target="slurm:debug", options={"time": "1"})
    model, job = finetune.start(db, checked, "timed")
    failed = settled(db, model.id, 150)
    assert failed.state == ModelState.FAILED
    assert failed.reason.startswith("its batch job reached its time limit of 00:01:00; r resumes from its checkpoint "
                                    "at step "), failed.reason
    step = int(failed.reason.rsplit(" ", 1)[1])
    assert "a checkpoint was asked for (SIGUSR1)" in job_log(db, job.id)
    _model, again = models.retry(db, "timed")
    wait_until(lambda: f"resuming from checkpoint-{step}" in job_log(db, again.id), 60, 0.5, "the resumed run")
    assert jobs.cancel(db, again.id).state == JobState.CANCELLED
    assert slurm.queue() == []


def test_a_killed_supervisor_loses_nothing_and_a_new_dashboard_shows_everything_as_it_is(db, slurm, tiny, tmp_path):
    import asyncio

    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.widgets.live_table import LiveTable

    served, serving_job = deployments.deploy(db, "tiny", DeploySettings(target="slurm:debug", gpus="0",
                                                                        options={"time": "5"}))
    served = deployment_where(db, served.id, lambda d: d.state != DeploymentState.PENDING, what="Ready")
    assert served.state == DeploymentState.READY, served.reason
    checked = finetune.plan(db, "tiny", write_dataset(tmp_path, "openai"), Hyperparameters(max_steps=300, **FAST),
                            "0", target="slurm:debug", options={"time": "5"})
    adapter, finetune_job = finetune.start(db, checked, "survivor")
    wait_until(lambda: metrics(db, finetune_job.id).get("step", 0) >= 1, 120, 0.2, "training")
    killed = {jobs.get(db, j.id).pid for j in (serving_job, finetune_job)}
    for pid in killed:
        os.kill(pid, signal.SIGKILL)  # a login node's watchdog, say
    wait_until(lambda: all(not jobs.process_alive(pid, None) for pid in killed), 10, 0.1, "the supervisors to die")
    batch_jobs = {job.id: metrics(db, job.id)["slurm_job"] for job in (serving_job, finetune_job)}

    async def dashboard():
        app = ModelDeckApp(db)  # a new dashboard: it reconciles, and new supervisors take over
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: app.store.loaded, what="first load")
            await pilot.press("3")
            table = app.screen.query_one("#table", LiveTable)
            await wait_for(pilot, lambda: "Ready" in str(table.cells(served.id)[3]), 10, "the deployment on screen")
            await pilot.press("2")
            try:
                await wait_for(pilot, lambda: app.store.models[adapter.id].model.state == ModelState.READY, 120,
                               "the fine-tune, followed again, to finish")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {job_log(db, finetune_job.id)[-3000:]}") from None

    asyncio.run(dashboard())
    for job in (serving_job, finetune_job):  # followed by new supervisors: the same batch jobs, never submitted again
        assert jobs.get(db, job.id).pid not in killed and metrics(db, job.id)["slurm_job"] == batch_jobs[job.id]
    assert deployment(db, served.id).state == DeploymentState.READY and slurm.queue() == [batch_jobs[serving_job.id]]
    assert metrics(db, finetune_job.id)["reattached"] == 1 and "re-attached to its work" in job_log(db, finetune_job.id)
    with db.read() as session:
        assert session.get(Model, adapter.id).meta["steps"] == 300


def test_a_passing_outage_of_the_controller_is_waited_out(db, slurm, tiny):
    started, job = deployments.deploy(db, "tiny", DeploySettings(target="slurm:debug", gpus="0", options={"time": "5"}))
    done = deployment_where(db, started.id, lambda d: d.state != DeploymentState.PENDING, what="Ready")
    assert done.state == DeploymentState.READY, done.reason
    supervisor = jobs.get(db, job.id).pid
    slurm.stop_controller()
    try:
        wait_until(lambda: "the SLURM controller cannot be reached" in job_log(db, job.id), 20, 0.5, "the outage seen")
        time.sleep(3)
        assert deployment(db, done.id).state == DeploymentState.READY  # its server goes on meanwhile
    finally:
        slurm.start_controller()
    time.sleep(3)
    assert deployment(db, done.id).state == DeploymentState.READY
    assert jobs.get(db, job.id).pid == supervisor and "reattached" not in metrics(db, job.id)  # the same one, all along
    deployments.stop(db, done.id)


# -- what is refused, each in one line, with nothing lost -----------------------------------------------


def test_requests_slurm_cannot_run_are_refused_with_the_reason(db, slurm, tiny, tmp_path, monkeypatch):
    data = write_dataset(tmp_path, "openai")
    for target, options, gpus, message in [
        ("slurm:nope", {}, "0", "no SLURM partition 'nope'; the cluster has: debug, gpu"),
        ("slurm:debug", {"time": "3:00:00"}, "0", "time limit 03:00:00 is over the maximum of the partition 'debug', "
                                                   "00:10:00"),
        ("slurm:gpu", {}, "4", "4 GPUs asked, but no node of the partition 'gpu' has more than 2"),
        ("slurm:gpu", {"cpus": "8"}, "0", "8 CPUs asked, but no node of the partition 'gpu' has more than 2"),
        ("slurm:debug", {"time": "soon"}, "0", "time limit 'soon': use minutes"),
        ("slurm:debug", {"sbatch": "--output=/tmp/x"}, "0", "modeldeck sets --output itself"),
        ("slurm:debug", {"sbatch": "--constraint=a100"}, "0", "SLURM refuses the batch job: .*Invalid feature specification"),
        ("slurm:debug", {"workdir": "/proc/modeldeck"}, "0", "the SLURM work directory /proc/modeldeck cannot be made"),
        ("slurm:debug", {"image": "x"}, "0", "Image: an image for the fine-tune is for a Kubernetes target"),
    ]:
        with pytest.raises(EngineError, match=message):
            finetune.plan(db, "tiny", data, Hyperparameters(), gpus, target=target, options=options)
    with pytest.raises(EngineError, match="vLLM needs GPUs"):
        deployments.plan(db, "tiny", DeploySettings(target="slurm:debug", backend="vllm", gpus="0"))
    for settings, message in ((DeploySettings(target="slurm:debug", port=8000), "Port 8000: the SLURM partition debug "
                                                                                 "decides it itself"),
                              (DeploySettings(target="slurm:debug", host="10.0.0.9"), "Bind address '10.0.0.9'")):
        with pytest.raises(EngineError, match=message):  # refused, not quietly dropped
            deployments.plan(db, "tiny", settings)
    assert slurm.queue() == [] and [r.model.name for r in models.model_rows(db)] == ["tiny"]  # nothing started
    down = tmp_path / "down.conf"  # the same cluster, at a port where no controller answers
    down.write_text(slurm.conf.read_text().replace("SlurmctldPort=", "SlurmctldPort=1#"))
    monkeypatch.setenv("SLURM_CONF", str(down))
    from engine.targets.slurm import commands

    commands._cache.clear()
    with pytest.raises(EngineError, match="^the SLURM controller cannot be reached"):
        finetune.plan(db, "tiny", data, Hyperparameters(), "0", target="slurm:debug")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EngineError, match="SLURM is not here: sbatch is not on PATH"):
        finetune.plan(db, "tiny", data, Hyperparameters(), "0", target="slurm")


def test_dry_run_prints_a_batch_script_that_sbatch_accepts_and_touches_nothing(db, slurm, tiny, tmp_path):
    data = write_dataset(tmp_path, "alpaca")
    cli = [sys.executable, "-m", "tui.cli"]
    env = dict(os.environ)
    result = subprocess.run(cli + ["finetune", "tiny", str(data), "--target", "slurm:gpu", "--gpus", "1", "--time",
                                   "30", "--mem", "2G", "--sbatch", "--constraint a100 --exclusive", "--dry-run"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "#!/bin/bash" and " -m engine.jobs.finetune --spec " in lines[-1]
    for option in ("--partition=gpu", "--time=00:30:00", "--gres=gpu:1", "--mem=2048M", "--constraint=a100",
                   "--exclusive", "--requeue", "--signal=B:USR1@300"):
        assert f"#SBATCH {option}" in lines
    served = subprocess.run(cli + ["deploy", "tiny", "--target", "slurm:debug", "--gpus", "0", "--sbatch",
                                   "--constraint=bigmem", "--dry-run"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert served.returncode == 0, served.stderr
    assert "engine.targets.slurm.launch" in served.stdout and "--port '{port}'" in served.stdout
    assert "#SBATCH --constraint=bigmem" in served.stdout  # an option's value that is an option itself
    assert "never in the script" in served.stderr
    script = tmp_path / "check.sh"
    script.write_text(served.stdout.replace("#SBATCH --constraint=bigmem\n", ""))  # no node has it
    said = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=30)
    assert said.returncode == 0 and "to start at" in said.stderr, said.stderr  # the controller's own check
    assert slurm.queue() == [] and deployments.deployment_rows(db) == []
    assert [r.model.name for r in models.model_rows(db)] == ["tiny"]


def test_every_follower_shares_one_squeue_call_per_poll(db, slurm, tmp_path):
    """Twelve followers in four processes, polling together for three seconds: squeue is called about once
    a second, not once per follower and poll."""
    probe = ("import sys, time, threading; from pathlib import Path; from engine.targets.slurm.queue import Queue\n"
             "q = Queue(Path(sys.argv[1]))\n"
             "def poll():\n"
             "    end = time.time() + 3\n"
             "    while time.time() < end:\n"
             "        q.jobs(); time.sleep(0.1)\n"
             "ts = [threading.Thread(target=poll) for _ in range(3)]\n"
             "[t.start() for t in ts]; [t.join() for t in ts]\n")
    from engine.jobs import child_env
    from engine.targets.slurm.queue import Queue

    runs = [subprocess.Popen([sys.executable, "-c", probe, str(tmp_path)], env=child_env()) for _ in range(4)]
    assert all(run.wait(timeout=60) == 0 for run in runs)
    calls, _since = Queue(tmp_path).calls()
    assert 2 <= calls <= 5, calls


# -- SLURM's language, without a cluster -------------------------------------------------------------------


def test_paths_the_compute_nodes_may_not_see_are_said():
    """The work directory and what a batch job runs or reads, on a filesystem of this machine's own, are
    warned of, unless the partition's one node is this machine."""
    import socket

    from engine.targets.slurm import unshared
    from engine.targets.slurm.commands import Node, Partition

    local = next(m for m in __import__("psutil").disk_partitions(all=True) if m.mountpoint == "/")
    elsewhere = Partition("gpu", True, False, None, [Node("node01", 8, 64000, 4, "IDLE")])
    here = Partition("gpu", True, False, None, [Node(socket.gethostname(), 8, 64000, 4, "IDLE")])
    warned = unshared(["/var/modeldeck-work", "/usr/bin/python3"], elsewhere)
    if local.fstype in ("nfs", "nfs4", "lustre", "gpfs"):
        assert warned == []
    else:
        assert warned[0].startswith(f"the work directory /var/modeldeck-work is on a {local.fstype} filesystem")
        assert warned[1].startswith("what the batch job runs or reads: /usr/bin/python3")
    assert unshared(["/var/modeldeck-work"], here) == []


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 5400), ("90:30", 5430), ("2:00:00", 7200), ("1-12", 129600), ("1-12:30", 131400), ("2-00:00:01", 172801),
    ("UNLIMITED", None), ("infinite", None),
])
def test_time_limits_read_as_sbatch_reads_them(text, seconds):
    from engine.targets.slurm.resources import format_time, parse_time

    assert parse_time(text) == seconds
    assert seconds is None or parse_time(format_time(seconds)) == seconds


def test_memory_gres_and_bad_spellings():
    from engine.targets.slurm.batch import check_extra
    from engine.targets.slurm.resources import gres_gpus, parse_memory_mb, parse_time

    assert [parse_memory_mb(t) for t in ("16G", "4000", "512M", "1.5G", "1T")] == [16384, 4000, 512, 1536, 1048576]
    assert [gres_gpus(g) for g in ("gpu:2", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:1,mps:100", "(null)", "")] == \
        [2, 4, 3, 0, 0]
    assert check_extra("--constraint a100 -C gpu --exclusive --mail-type=END") == \
        ["--constraint=a100", "-C gpu", "--exclusive", "--mail-type=END"]
    for bad, message in (("constraint", "is not an option"), ("--job-name=x", "sets --job-name itself"),
                         ("--chdir /tmp", "sets --chdir itself"), ("'open", "No closing quotation")):
        with pytest.raises(ValueError, match=message):
            check_extra(bad)
    for bad in ("1:2:3:4", "two hours", "-5"):
        with pytest.raises(ValueError, match="use minutes"):
            parse_time(bad)
    with pytest.raises(ValueError, match="a size like 16G"):
        parse_memory_mb("lots")


@pytest.mark.parametrize(("state", "code", "expected"), [
    ("COMPLETED", "0", (True, None)),
    ("FAILED", "768", (False, "its batch job exited with code 3")),
    ("FAILED", "9", (False, "its batch job was killed by signal 9")),
    ("TIMEOUT", "0", (False, "its batch job reached its time limit of 2:00:00")),
    ("OUT_OF_MEMORY", "0:125", (False, "its batch job ran out of memory: ask for more memory")),
    ("NODE_FAIL", "0", (False, "its node failed while it ran")),
    ("PREEMPTED", "0", (False, "its batch job was preempted by a higher priority job")),
    ("CANCELLED by 0", "0:15", (False, "its batch job was cancelled outside modeldeck (scancel)")),
])
def test_how_a_batch_job_ended_reads(state, code, expected):
    from engine.targets.slurm.states import ending

    end = ending(state, code, "2:00:00")
    assert (end.succeeded, end.reason) == expected


@pytest.mark.parametrize(("reason", "gpus", "words"), [
    ("Resources", True, "waiting for GPUs"),
    ("Resources", False, "waiting for CPUs or memory"),
    ("Priority", True, "queued behind higher priority jobs"),
    ("QOSMaxGRESPerUser", True, "held by a QoS or account limit (QOSMaxGRESPerUser)"),
    ("AssocGrpGRES", True, "held by a QoS or account limit (AssocGrpGRES)"),
    ("ReqNodeNotAvail, UnavailableNodes:vm", False,
     "the nodes it needs are not available (down, drained or reserved) (UnavailableNodes:vm)"),
    ("InvalidQOS", False, "waiting (InvalidQOS)"),
    ("BeginTime", False, "waiting for its start time"),
])
def test_why_a_job_waits_reads_in_words(reason, gpus, words):
    from engine.targets.slurm.states import pending_words

    assert pending_words(reason, gpus) == words


def test_a_hub_model_is_deployed_on_slurm_without_a_download_here(db, slurm, tiny_model_dir, monkeypatch):
    """The batch job downloads it (into the work directory's cache) from the Hub — here the tests' own Hub,
    serving the tiny model: nothing is downloaded to this machine, and Custom lists it as living on SLURM."""
    from openai import OpenAI

    from engine import hub as hubmod
    from engine.format import model_location
    from tests.hubserver import HubServer, Repo

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    server = HubServer({"org/tiny-real": Repo(files)}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(EngineError, match="org/tiny-real is not on this machine: download it first"):
            deployments.plan(db, "org/tiny-real", DeploySettings())  # this machine downloads nothing by itself
        started, job = deployments.deploy(db, "org/tiny-real", DeploySettings(target="slurm:debug", gpus="0",
                                                                             backend="transformers",
                                                                             options={"time": "5"}))
        [row] = models.model_rows(db)
        assert (row.model.name, row.model.state, row.model.path) == ("tiny-real", ModelState.READY, None)
        assert model_location(row.model) == "downloaded from the Hub by its batch jobs on the SLURM partition debug"
        done = deployment_where(db, started.id, lambda d: d.state != DeploymentState.PENDING, what="Ready")
        assert done.state == DeploymentState.READY, (done.reason, job_log(db, job.id)[-2000:])
        reply = OpenAI(base_url=done.endpoint, api_key=done.api_key, max_retries=0).completions.create(
            model="tiny-real", prompt="hi", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens >= 1
        assert not hubmod.repo_cache_dir("org/tiny-real").exists()  # not here
        cache = Path(os.environ["MODELDECK_HOME"]) / "slurm" / "hf" / "hub" / "models--org--tiny-real"
        assert cache.is_dir()  # in the work directory's cache, by the batch job
        deployments.stop(db, done.id)
        with pytest.raises(EngineError, match="tiny-real lives on the SLURM partition debug, whose batch jobs "
                                              "download it: deploy it there, or download it here first"):
            deployments.plan(db, "tiny-real", DeploySettings())
    finally:
        server.stop()


def test_a_supervisor_that_keeps_dying_is_given_up_and_its_batch_job_cancelled(db, slurm, tmp_path):
    """Re-attached REATTACH_LIMIT times already, a job whose supervisor is gone again is failed, and what it
    had running on the cluster (the batch jobs its run's folder names) is cancelled: nothing runs on unfollowed."""
    from catalog.schema import Job, JobKind, now

    run = tmp_path / "md-ft-x-run"
    run.mkdir()
    batch_job = slurm.command("sbatch", "--parsable", "--partition=debug", "--time=5", "--output=/dev/null",
                              "--job-name=md-ft-x-run", "--wrap", "sleep 300").strip()
    (run / "attempt-1.json").write_text(json.dumps({"job_id": batch_job, "submitted_at": time.time()}))
    with db.write() as session:
        job = Job(kind=JobKind.FINETUNE, state=JobState.RUNNING, title="x", pid=2**22 + 7, host=jobs.HERE,
                  heartbeat_at=now() - 120, params_json=Job.dumps({"target": "slurm:debug"}),
                  metrics_json=Job.dumps({"reattached": jobs.REATTACH_LIMIT, "slurm_run": str(run)}))
        session.add(job)
    assert jobs.reconcile(db) == [job.id]
    assert jobs.get(db, job.id).state == JobState.FAILED
    wait_until(lambda: batch_job not in slurm.queue(), 30, 0.2, "its batch job to be cancelled")


def test_a_runs_output_is_read_by_lines_whatever_its_progress_bars_write(tmp_path):
    """transformers redraws its bars with carriage returns: a line is what ends in a newline (its last
    state), and a new supervisor reads it all again without copying what was copied."""
    from types import SimpleNamespace

    from engine.targets.slurm.run import BatchJob

    run = tmp_path / "run"
    run.mkdir()
    (run / "attempt-1.json").write_text(json.dumps({"job_id": "7", "submitted_at": 0}))
    log = run / "slurm-7.log"
    log.write_bytes(b"\rLoading weights:   0%\rLoading weights: 100%\n@modeldeck {\"phase\": \"training\"}\nstep 1/4")
    ctx = SimpleNamespace(db=SimpleNamespace(path=tmp_path / "modeldeck.db"), metrics={}, reattached=False,
                          report=lambda **_: None)
    first = BatchJob(ctx, run, 1, False)
    assert first.new_lines() == [("Loading weights: 100%", True), ('@modeldeck {"phase": "training"}', True)]
    with log.open("ab") as f:
        f.write(b"  loss 5.1\n")
    assert first.new_lines() == [("step 1/4  loss 5.1", True)]
    again = BatchJob(SimpleNamespace(**vars(ctx) | {"reattached": True}), run, 1, False)
    assert [new for _, new in again.new_lines()] == [False, False, False]  # read anew, copied before
