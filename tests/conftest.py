"""Shared fixtures: every test gets its own MODELDECK_HOME and Hugging Face cache, a UTC clock, no
token and no network but the loopback Hub the tests start."""

from __future__ import annotations

import getpass
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.hubserver import HubServer, Repo

os.environ["TZ"] = "UTC"
time.tzset()
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# An address nothing listens on: "offline" unless a test points HF_ENDPOINT at its loopback Hub.
OFFLINE_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "home"
    monkeypatch.setenv("MODELDECK_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", OFFLINE_ENDPOINT)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))  # never the developer's clusters
    monkeypatch.setenv("MODELDECK_SLURM", "off")  # nor their SLURM cluster (the `slurm` fixture gives one)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # nor their config file
    monkeypatch.delenv("MODELDECK_CONFIG", raising=False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "XDG_CACHE_HOME",
                 "MODELDECK_VLLM_IMAGE", "MODELDECK_FINETUNE_IMAGE"):  # the images' defaults are the tests' to set
        monkeypatch.delenv(name, raising=False)
    if "tui.app" in sys.modules:  # the dashboard's tests draw a machine without GPUs, whatever this one has
        monkeypatch.setattr(sys.modules["tui.app"].ModelDeckApp, "gpu_reader", staticmethod(lambda db: []))
    yield home
    if (home / "modeldeck.db").exists():  # a test that failed half-way (or ran the CLI) leaves nothing running
        import engine

        database = engine.start()
        _stop_jobs(database)
        database.close()


@pytest.fixture
def db(isolated):
    import engine

    database = engine.start()
    yield database
    _stop_jobs(database)
    database.close()


def _stop_jobs(database) -> None:
    """Leave nothing running: end every job process a test started."""
    from sqlmodel import select

    from catalog.schema import Job, JobState
    from engine import jobs

    with database.read() as session:
        running = session.exec(select(Job).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))).all()
    for job in running:
        if job.pid != os.getpid() and jobs.process_alive(job.pid, job.pid_started_at):
            jobs.stop_process_group(job.pid, deadline_s=2)


def weights(size: int, seed: int = 1) -> bytes:
    return (seed.to_bytes(4, "little") * (size // 4 + 1))[:size]


# huggingface_hub writes downloads in 10 MiB chunks: "big" spans several, so progress and resume show.
BIG = 32 * 1024 * 1024
TINY_FILES = {
    "config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
    "model.safetensors": weights(2_000_000),
    "pytorch_model.bin": weights(100_000, 2),  # must not be fetched next to safetensors
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "original/consolidated.00.pth": weights(10_000, 3),
    "README.md": b"# tiny",
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = HubServer({
        "org/tiny": Repo(dict(TINY_FILES)),
        "org/big": Repo({"config.json": TINY_FILES["config.json"], "model.safetensors": weights(BIG, 4),
                         "tokenizer.json": b"{}"}),
        "org/gated": Repo(dict(TINY_FILES), gated=True),
    }).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def settled(db, model_id: int, timeout: float = 60):
    """Wait, reconciling as any reader does, until a model leaves Pending; returns it."""
    from catalog.schema import Model, ModelState
    from engine import jobs

    def done():
        jobs.reconcile(db)
        with db.read() as session:
            model = session.get(Model, model_id)
        return model if model.state != ModelState.PENDING else None

    return wait_until(done, timeout, 0.1, "the model to leave Pending")


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    from tests.tinymodel import make_tiny_llama

    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def tiny(db, tiny_model_dir):
    """The tiny model in Custom, as "tiny" (imported in place)."""
    from engine import models

    models.import_path(db, tiny_model_dir, "tiny")
    return tiny_model_dir


FAST = {"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-2}  # a fine-tune of the tiny model in seconds


def deployment_now(db, deployment_id):
    """A deployment as any reader sees it, after reconciling."""
    from catalog.schema import Deployment
    from engine import jobs

    jobs.reconcile(db)
    with db.read() as session:
        return session.get(Deployment, deployment_id)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where NVML lists a CUDA GPU; elsewhere they skip, saying why. The tests on the one
    SLURM cluster run in one worker when pytest-xdist spreads the rest: one cluster serves them all
    (otherwise each worker would start a cluster of its own, both on this one node)."""
    from engine.gpus import list_gpus

    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))

    if any(item.get_closest_marker("gpu") for item in items) and not list_gpus():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (NVML lists none on this machine)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster for the session (tests/slurmcluster.py); its tests skip, saying why,
    where one cannot start."""
    from tests import slurmcluster

    try:
        cluster = slurmcluster.start(tmp_path_factory.mktemp("slurm"))
    except slurmcluster.Unavailable as exc:
        pytest.skip(str(exc))
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_cluster, monkeypatch):
    """The cluster, named by SLURM_CONF for this test's commands and jobs; whatever the test left in its queue
    is cancelled afterwards."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.delenv("MODELDECK_SLURM")
    from engine.targets.slurm import commands

    commands._cache.clear()  # what another test's cluster offered
    yield slurm_cluster
    slurm_cluster.command("scancel", "--user", getpass.getuser(), check=False)
    wait_until(lambda: not slurm_cluster.queue(), 60, 0.2, "the test's batch jobs to leave the queue")


# Kubernetes on an emulator: kmock (an in-memory API server over HTTP, with its pytest fixture `kmock`),
# the test playing the controllers' part.

@pytest.fixture
def emulator(request):
    pytest.importorskip("kmock", reason="the test extra brings kmock")
    kmock = request.getfixturevalue("kmock")
    # Every kind modeldeck creates or lists, as a real API server serves them all.
    for resource in ("batch/v1/jobs", "v1/configmaps", "v1/pods", "v1/secrets", "v1/persistentvolumeclaims",
                     "v1/services", "apps/v1/deployments", "v1/events"):
        kmock.resources[resource] = {}
    return kmock


KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{{name: emulator, cluster: {{server: "{url}"}}}}]
users: [{{name: ada, user: {{token: t}}}}]
contexts: [{{name: emu, context: {{cluster: emulator, user: ada, namespace: ml}}}}]
current-context: emu
"""


@pytest.fixture
def on_emulator(emulator, db, tmp_path, monkeypatch):
    """The kubeconfig points at the emulator; a Hub model is in Custom (the cluster downloads it itself)."""
    from catalog.schema import Model, ModelKind, ModelState

    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG.format(url=str(emulator.url).rstrip("/")))
    monkeypatch.setenv("KUBECONFIG", str(config))
    with db.write() as session:
        session.add(Model(name="qwen", kind=ModelKind.BASE, state=ModelState.READY, source="hub:Qwen/Qwen2.5-0.5B-Instruct",
                          repo_id="Qwen/Qwen2.5-0.5B-Instruct", revision="7ae5576", path=str(tmp_path)))
    return emulator
