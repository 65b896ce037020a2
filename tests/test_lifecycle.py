"""One set of lifecycle scenarios, run against every target: this machine, a SLURM cluster for real
(tests/slurmcluster.py), and Kubernetes on an emulator (kmock), where the test plays the cluster's part — the
Job controller and the kubelet run the real fine-tune entry point here and serve its log; kubectl's
port-forward starts the real built-in server. A new target proves itself by passing them.

Each scenario goes through the engine's operations only, as the dashboard and the CLI do:
- a fine-tune to Ready, with its loss curve;
- a deployment to Ready, answering the `openai` SDK, then stopped, with nothing of it left on the target;
- a running fine-tune cancelled, ending Cancelled, nothing of it left running;
- a supervisor killed: the target says what becomes of its work (a batch job is followed again; a
  server here ends with it; a cluster's objects wait for the deployment's deletion).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys

import pytest

from catalog.schema import Deployment, DeploymentState, JobState, Model, ModelState
from engine import deployments, finetune, jobs
from engine.backends import DeploySettings
from engine.errors import EngineError
from engine.hyperparameters import Hyperparameters
from tests.conftest import FAST
from tests.tinydata import write_dataset


class Driver:
    """What a scenario needs of a target: where to run, with what, and the target's side of the story."""

    target = ""
    model = "tiny"  # what is fine-tuned and deployed
    settings: dict = {}
    finetune_options: dict = {}
    gpus = "cpu"
    killed_supervisor = "fails"  # what a killed supervisor's work becomes: "fails" or "goes on"

    async def play(self) -> None:
        """One turn of the target's own controllers, where the test plays them."""

    async def settle(self) -> None:
        """At a scenario's end: what the test played on the target's behalf ends."""

    def left(self) -> set:
        """What of modeldeck's work is left running on the target."""
        return set()


class Local(Driver):
    def left(self) -> set:
        import psutil

        from engine.jobs import JOB_TAG

        found = set()
        for process in psutil.process_iter():
            try:
                if process.environ().get(JOB_TAG, "").startswith(os.environ["MODELDECK_HOME"]):
                    found.add(process.pid)
            except psutil.Error:
                continue
        return found


class Slurm(Driver):
    target = "slurm:debug"
    settings = {"gpus": "0", "options": {"time": "5"}}
    finetune_options = {"time": "5"}
    gpus = "0"
    killed_supervisor = "goes on"

    def __init__(self, cluster):
        self.cluster = cluster

    def left(self) -> set:
        return set(self.cluster.queue())


class Kubernetes(Driver):
    """kmock serves the API; the test is the Job controller and kubelet (a fine-tune's pod runs the real
    entry point here and its log is served), and kubectl (its port-forward is the real built-in server)."""

    target = "emu/ml"
    model = "qwen"  # a Hub model: the cluster downloads what it runs
    finetune_options = {"image": "registry.local/modeldeck-finetune:0.1"}
    gpus = "0"

    def __init__(self, emulator, db, tmp_path, tiny_model_dir):
        from tests.test_kube import client_for

        self.emulator, self.db, self.tmp, self.tiny = emulator, db, tmp_path, tiny_model_dir
        self.client = client_for(emulator)
        self.played: set[str] = set()
        self.runs: dict[str, asyncio.subprocess.Process] = {}  # the pods' runs, by their Job

    async def settle(self) -> None:
        """The pods the Job controller would remove: their runs end."""
        for run in self.runs.values():
            if run.returncode is None:
                run.kill()
                await run.wait()

    async def play(self) -> None:
        import kubernetes

        core, apps = kubernetes.client.CoreV1Api(self.client), kubernetes.client.AppsV1Api(self.client)
        batch = kubernetes.client.BatchV1Api(self.client)
        listed = (await asyncio.to_thread(batch.list_namespaced_job, "ml")).items
        for job in listed:
            if job.metadata.name not in self.played:
                self.played.add(job.metadata.name)
                await self.run_the_job(job, core, batch)
        for name, run in self.runs.items():  # a deleted Job's pod goes (its propagation: Background)
            if name not in {job.metadata.name for job in listed} and run.returncode is None:
                run.terminate()
        for deployment in (await asyncio.to_thread(apps.list_namespaced_deployment, "ml")).items:
            if deployment.metadata.name not in self.played:
                self.played.add(deployment.metadata.name)
                labels = deployment.spec.template.metadata.labels
                await asyncio.to_thread(core.create_namespaced_pod, "ml", {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": deployment.metadata.name + "-1", "namespace": "ml", "labels": labels},
                    "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
                    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})

    async def run_the_job(self, job, core, batch) -> None:
        """The Job's pod: the entry point on the files its ConfigMap and Secrets hold, its log served."""
        from engine.jobs import child_env
        from tests.test_kube import timestamped

        name, folder = job.metadata.name, self.tmp / job.metadata.name
        folder.mkdir(parents=True, exist_ok=True)
        secrets = (await asyncio.to_thread(core.list_namespaced_secret, "ml")).items
        for secret in secrets:
            for key, packed in (secret.data or {}).items():
                if key.startswith("dataset.gz."):
                    (folder / key).write_bytes(base64.b64decode(packed))
        spec = json.loads((await asyncio.to_thread(core.read_namespaced_config_map, f"{name}-spec", "ml"))
                          .data["finetune.json"])
        # The pod's base is the tests' tiny model (not the Hub's): its own max length.
        spec |= {"dataset_parts": str(folder), "base_path": str(self.tiny), "output": str(folder / "adapter")}
        spec["hyperparameters"]["max_length"] = 0
        (folder / "finetune.json").write_text(json.dumps(spec))
        run = await asyncio.create_subprocess_exec(sys.executable, "-m", "engine.jobs.finetune", "--spec",
                                                   str(folder / "finetune.json"), env=child_env(),
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self.runs[name] = run
        log = {"text": ""}

        async def read() -> None:  # the log grows as the pod runs
            async for line in run.stdout:
                log["text"] += line.decode(errors="replace")

        reading = asyncio.ensure_future(read())
        pod = job.spec.template.metadata.labels
        self.emulator[f"get /api/v1/namespaces/ml/pods/{name}-x1/log"] << (lambda: timestamped(log["text"]))
        await asyncio.to_thread(core.create_namespaced_pod, "ml", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-x1", "namespace": "ml", "labels": pod},
            "spec": {"containers": [{"name": "finetune", "image": "x"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "finetune", "image": "x", "imageID": "",
                                                                    "ready": True, "restartCount": 0,
                                                                    "state": {"running": {}}}]}})

        async def finish() -> None:  # the Job controller's part: it completed, or failed (no retries)
            await reading
            done = await run.wait() == 0
            condition = {"type": "Complete" if done else "Failed", "status": "True"}
            await asyncio.to_thread(batch.patch_namespaced_job, name, "ml", {"status": {
                "conditions": [condition], "succeeded" if done else "failed": 1}})

        asyncio.ensure_future(finish())

    def left(self) -> set:
        from tests.test_kube import live

        return {(kind, name) for kind, name in live(self.emulator) if kind not in ("persistentvolumeclaims", "pods")}


@pytest.fixture
def kubectl(tmp_path, monkeypatch, tiny_model_dir):
    """The test's kubectl: its port-forward serves the tiny model with the built-in server, on the local port,
    with the deployment's key read from its Secret on the emulator (as a real forward reaches the pod)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kubectl"
    shim.write_text(f"""#!{sys.executable}
import os, sys
from kubernetes import client, config
args = sys.argv[1:]
assert "port-forward" in args, args
api = config.new_client_from_config(config_file=os.environ["KUBECONFIG"], context=args[args.index("--context") + 1])
namespace, service = args[args.index("-n") + 1], next(a for a in args if a.startswith("svc/"))[4:]
secret = client.CoreV1Api(api).read_namespaced_secret(service + "-api-key", namespace)
key = (secret.string_data or {{}}).get("api-key") or __import__("base64").b64decode(secret.data["api-key"]).decode()
container = client.AppsV1Api(api).read_namespaced_deployment(service, namespace).spec.template.spec.containers[0]
served = container.args[container.args.index("--served-model-name") + 1]
local = args[-1].split(":")[0]
os.execvpe(sys.executable, [sys.executable, "-m", "engine.server", "--model", {str(tiny_model_dir)!r}, "--served-name",
                            served, "--port", local], dict(os.environ, MODELDECK_API_KEY=key))
""")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(params=["local", pytest.param("slurm", marks=pytest.mark.xdist_group("slurm")), "kubernetes"])
def driver(request, db, tiny, tiny_model_dir, tmp_path):
    if request.param == "local":
        return Local()
    if request.param == "slurm":
        return Slurm(request.getfixturevalue("slurm"))
    request.getfixturevalue("kubectl")
    return Kubernetes(request.getfixturevalue("on_emulator"), db, tmp_path, tiny_model_dir)


async def until(driver: Driver, db, read, predicate, timeout: float = 120, what: str = ""):
    """Reconcile as every reader does, and let the target play its part, until `predicate(read())`."""
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        await asyncio.to_thread(jobs.reconcile, db)
        await driver.play()
        value = await asyncio.to_thread(read)
        if predicate(value):
            return value
        await asyncio.sleep(0.2)  # the emulator answers on this loop
    raise AssertionError(f"timed out waiting for {what}: {value}")


async def call(function, *args, **kwargs):
    """An engine call in a thread, the loop going on (the emulator answers on it)."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs))
    while not task.done():
        await asyncio.sleep(0.05)
    return await task


def model_row(db, model_id) -> Model:
    with db.read() as session:
        return session.get(Model, model_id)


def deployment_row(db, deployment_id) -> Deployment:
    with db.read() as session:
        return session.get(Deployment, deployment_id)


async def start_finetune(driver: Driver, db, tmp_path, name: str, steps: int):
    checked = await call(finetune.plan, db, driver.model, write_dataset(tmp_path, "openai"),
                         Hyperparameters(max_steps=steps, **FAST), driver.gpus, target=driver.target or None,
                         options=driver.finetune_options)
    return await call(finetune.start, db, checked, name)


async def test_a_finetune_goes_to_ready_with_its_loss_curve(driver, db, tmp_path):
    model, job = await start_finetune(driver, db, tmp_path, "scenario-lora", 6)
    done = await until(driver, db, lambda: model_row(db, model.id), lambda m: m.state != ModelState.PENDING,
                       what="the adapter to leave Pending")
    assert done.state == ModelState.READY, (done.reason, jobs.log_tail(jobs.get(db, job.id).log_path, 30))
    curve = json.loads(jobs.get(db, job.id).metrics_json)["curve"]["train"]
    assert curve[-1][0] == 6 and all(loss > 0 for _, loss in curve)
    assert done.meta["steps"] == 6 and done.meta["final_loss"] > 0
    # the job marks its model Ready, then its process ends (a torch-laden interpreter takes a moment on a
    # busy machine): nothing of it may be left once it has
    await until(driver, db, driver.left, lambda left: not left, 30, what="the job's processes to end")


async def deployed(driver: Driver, db):
    """The tiny model deployed on the driver's target, once it is Ready."""
    started, job = await call(deployments.deploy, db, driver.model,
                              DeploySettings(target=driver.target, **driver.settings))
    done = await until(driver, db, lambda: deployment_row(db, started.id),
                       lambda d: d.state != DeploymentState.PENDING, what="Ready")
    assert done.state == DeploymentState.READY, (done.reason, jobs.log_tail(jobs.get(db, job.id).log_path, 30))
    return done, job


async def test_a_deployment_goes_ready_answers_the_openai_sdk_and_stops_leaving_nothing(driver, db):
    from openai import OpenAI

    done, job = await deployed(driver, db)
    client = OpenAI(base_url=done.endpoint, api_key=done.api_key, max_retries=0)
    reply = await asyncio.to_thread(client.chat.completions.create, model=done.served_name, max_tokens=3,
                                    temperature=0, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens >= 1
    stopped = await call(deployments.stop, db, done.id)
    assert stopped.state == DeploymentState.STOPPED and jobs.get(db, job.id).state == JobState.CANCELLED
    assert driver.left() == set()
    await driver.settle()


async def test_a_running_finetune_cancelled_ends_cancelled_with_nothing_left_running(driver, db, tmp_path):
    model, job = await start_finetune(driver, db, tmp_path, "halted", 1_000_000)
    await until(driver, db, lambda: json.loads(jobs.get(db, job.id).metrics_json or "{}"),
                lambda m: m.get("step", 0) >= 1, what="training")
    try:
        cancelled = await call(jobs.cancel, db, job.id)
    except EngineError:  # it ended by itself first: say why (a CI run saw "already failed" once)
        ended = jobs.get(db, job.id)
        raise AssertionError(f"job {ended.state.value} before the cancel: {ended.error}\n"
                             + "\n".join(jobs.log_tail(ended.log_path, 30))) from None
    assert cancelled.state == JobState.CANCELLED
    assert model_row(db, model.id).reason == "finetune cancelled"
    assert driver.left() == set()
    await driver.settle()


def test_a_stop_returns_only_once_nothing_of_the_jobs_process_group_runs(tmp_path):
    """The leader (the keeper shell) can end before the job process beside it: a stop that settled the
    job then would leave it running for a moment (seen on a busy CI machine after a SIGKILL)."""
    import subprocess
    import time

    ended = tmp_path / "member-ended"
    member = (f"import signal, time, pathlib; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), "
              f"pathlib.Path({str(ended)!r}).touch(), exit(0))); time.sleep(60)")
    leader = subprocess.Popen(["/bin/sh", "-c", f'{sys.executable} -c "$0" & sleep 0.5; exec sleep 60', member],
                              start_new_session=True)
    time.sleep(1)
    assert jobs.stop_process_group(leader.pid, deadline_s=10)
    assert ended.exists() and not jobs.group_alive(leader.pid)
    leader.wait()


async def test_a_killed_supervisor_leaves_its_work_as_its_target_says(driver, db):
    done, job = await deployed(driver, db)
    os.kill(jobs.get(db, job.id).pid, signal.SIGKILL)
    if driver.killed_supervisor == "goes on":  # a new supervisor follows the same work: it stays Ready
        await until(driver, db, lambda: jobs.get(db, job.id), lambda j: jobs.process_alive(j.pid, j.pid_started_at)
                    and json.loads(j.metrics_json).get("reattached") == 1, 30, "a new supervisor")
        await asyncio.sleep(3)
        assert deployment_row(db, done.id).state == DeploymentState.READY
        await call(deployments.stop, db, done.id)
    else:  # it ends Failed, saying so; nothing runs on unsupervised
        failed = await until(driver, db, lambda: deployment_row(db, done.id),
                             lambda d: d.state != DeploymentState.READY, 30, "Failed")
        assert failed.state == DeploymentState.FAILED and "supervisor stopped" in failed.reason
        await call(deployments.delete, db, done.id)  # what a cluster keeps goes with its record
    assert driver.left() == set()
    await driver.settle()


# -- the one transition function of each entity (engine/lifecycle.py) ----------------------------------------


def test_each_entity_moves_only_as_its_table_allows_and_each_move_is_one_event(db):
    from sqlmodel import func, select

    from catalog.schema import Event
    from engine.lifecycle import move_deployment, move_model

    def events() -> int:
        with db.read() as session:
            return session.exec(select(func.count(Event.id))).one()

    with db.write() as session:
        model = Model(name="m", source="import:/x", state=ModelState.PENDING)
        deployment = Deployment(name="d", backend="transformers")
        session.add(model)
        session.add(deployment)
    before = events()
    with db.write() as session:
        model, deployment = session.get(Model, model.id), session.get(Deployment, deployment.id)
        assert move_model(session, model, ModelState.FAILED, "broken") and model.reason == "broken"
        assert move_model(session, model, ModelState.PENDING, message="retrying")  # a failed one is retried
        assert not move_model(session, model, ModelState.PENDING)  # already there
        assert move_deployment(session, deployment, DeploymentState.PENDING, phase="loading weights")
        assert not move_deployment(session, deployment, DeploymentState.PENDING, phase="loading weights")  # no change
        assert move_deployment(session, deployment, DeploymentState.READY)
        assert move_deployment(session, deployment, DeploymentState.STOPPED, "stopped")
        for state in DeploymentState:  # Stopped is never left
            assert not move_deployment(session, deployment, state, "again")
    assert events() - before == 5  # one per move, none for a refused one
    assert (deployment_row(db, deployment.id).state, deployment_row(db, deployment.id).reason) == \
        (DeploymentState.STOPPED, "stopped")


def test_no_two_target_fields_of_one_dialog_share_a_name():
    """Each names a row of the dialogs and a flag of the CLI: for a use, every target's fields are apart."""
    from engine import targets

    for use in ("deploy", "finetune"):
        names = [option.name for option, _ in targets.option_fields() if use in option.uses]
        names += [kind.SPEC_FIELD.name for kind in targets.kinds() if kind.SPEC_FIELD]
        assert len(names) == len(set(names)), names
