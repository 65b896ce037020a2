"""Helpers for Pilot and snapshot tests: a seeded database and waiting on the live app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import psutil

from catalog.schema import (
    Deployment,
    DeploymentState,
    Job,
    JobKind,
    JobState,
    Model,
    ModelKind,
    ModelState,
)
from tests.conftest import TINY_FILES  # noqa: F401  (re-exported for tests)

T0 = 1_795_600_000.0  # a fixed clock for rows shown in snapshots (2026-11-25 08:26 UTC)


async def wait_for(pilot, predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


LOG_LINES = [
    "08:26:40 job 1 (download) started: download HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "08:26:40 asking https://huggingface.co for the files of HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "08:26:41 revision 31b70e2e869a7173562077fd711b654946d38674: 6 files, 3422000000 bytes",
    "Fetching 6 files:  33%|███▎      | 2/6 [00:29<00:58, 14.6s/it]",
]


SERVE_LOG_LINES = [
    "09:00:01 job 2 (serve) started: serve Qwen2.5-0.5B-Instruct (transformers)",
    "09:00:01 starting: python -m engine.server --model /data/hf/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae5576 "
    "--served-name support-bot --host 127.0.0.1 --port 8001 --dtype auto",
    "INFO:     Started server process [4242]",
    "INFO:     Uvicorn running on http://127.0.0.1:8001 (Press CTRL+C to quit)",
    "09:00:09 ready at http://127.0.0.1:8001/v1",
]


def seed(db) -> dict[str, int]:
    """A base model, its adapter and merged model, a failed download, a download in progress, and
    deployments in each state: enough for every row style."""
    with db.write() as session:
        base = Model(name="Qwen2.5-0.5B-Instruct", kind=ModelKind.BASE, state=ModelState.READY,
                     source="hub:Qwen/Qwen2.5-0.5B-Instruct", repo_id="Qwen/Qwen2.5-0.5B-Instruct",
                     revision="7ae557604adf67be50417f59c2c2f167def9a775",
                     path="/data/hf/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/7ae5576",
                     size_bytes=988_097_824, created_at=T0, updated_at=T0)
        session.add(base)
        session.flush()
        adapter = Model(name="support-bot-lora", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune",
                        base_id=base.id, path="/data/modeldeck/models/support-bot-lora", owns_path=True,
                        size_bytes=8_798_208, created_at=T0 + 3600, updated_at=T0 + 3600,
                        meta_json=Model.dumps({"dataset": "/data/support.jsonl", "rank": 16}))
        merged = Model(name="support-bot-merged", kind=ModelKind.MERGED, state=ModelState.READY, source="merge",
                       base_id=base.id, path="/data/modeldeck/models/support-bot-merged", owns_path=True,
                       size_bytes=988_100_000, created_at=T0 + 7200, updated_at=T0 + 7200)
        failed = Model(name="Llama-3.2-1B-Instruct", state=ModelState.FAILED, source="hub:meta-llama/Llama-3.2-1B-Instruct",
                       repo_id="meta-llama/Llama-3.2-1B-Instruct",
                       reason="meta-llama/Llama-3.2-1B-Instruct is gated: accept its licence at "
                              "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct, then log in "
                              "(`hf auth login` or set HF_TOKEN) and retry",
                       created_at=T0 + 8000, updated_at=T0 + 8000)
        pending = Model(name="SmolLM2-1.7B-Instruct", state=ModelState.PENDING,
                        source="hub:HuggingFaceTB/SmolLM2-1.7B-Instruct", repo_id="HuggingFaceTB/SmolLM2-1.7B-Instruct",
                        created_at=T0 + 9000, updated_at=T0 + 9000)
        session.add_all([adapter, merged, failed, pending])
        session.flush()
        log_path = db.path.parent / "logs" / "job-1-download.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("\n".join(LOG_LINES) + "\n")
        job = Job(kind=JobKind.DOWNLOAD, state=JobState.RUNNING, model_id=pending.id, title="download",
                  log_path=str(log_path),
                  # the test process stands in for the job process, so reconciling leaves it running
                  pid=os.getpid(), pid_started_at=psutil.Process().create_time(), bytes_done=1_420_000_000, bytes_total=3_422_000_000, rate=48_500_000.0, eta_s=41.0,
                  progress=0.41, created_at=T0 + 9000)
        session.add(job)
        session.flush()
        pending.job_id = job.id
        serve_log = db.path.parent / "logs" / "job-2-serve.log"
        serve_log.write_text("\n".join(SERVE_LOG_LINES) + "\n")
        serve_job = Job(kind=JobKind.SERVE, state=JobState.RUNNING, title="serve Qwen2.5-0.5B-Instruct (transformers)",
                        log_path=str(serve_log), pid=os.getpid(), pid_started_at=psutil.Process().create_time(),
                        created_at=T0)
        session.add(serve_job)
        session.flush()
        for name, state, phase, reason, port in [
            ("support-bot", DeploymentState.READY, None, None, 8001),
            ("qwen-small", DeploymentState.PENDING, "loading weights", None, 8002),
            ("broken", DeploymentState.FAILED, None, "server exited with code 1", 8003),
        ]:
            settings = {"backend": "auto", "gpus": "auto", "tensor_parallel": 1, "dtype": "auto", "max_model_len": 0,
                        "gpu_memory_fraction": 0.9, "port": port, "host": "127.0.0.1", "served_name": ""}
            session.add(Deployment(model_id=base.id, name=name, backend="transformers", state=state, phase=phase,
                                   reason=reason, endpoint=f"http://127.0.0.1:{port}/v1", served_name=name,
                                   api_key="sk-md-0123456789abcdef", gpus="cpu", settings_json=Deployment.dumps(settings),
                                   job_id=serve_job.id if state == DeploymentState.READY else None,
                                   created_at=T0, updated_at=T0))
    return {"base": base.id, "adapter": adapter.id, "pending": pending.id, "failed": failed.id}


TRAINING_LOG = [
    "09:40:02 job 3 (finetune) started: fine-tune Qwen2.5-0.5B-Instruct on support-chat.jsonl",
    "09:40:09 LoRA r=16 alpha=32 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: 8,798,208 trainable",
    "09:40:10 training: 1,900 rows, 100 validation rows, 400 steps",
    "09:52:31 step 120/400  epoch 1.20  loss 1.3412  lr 1.71e-04  2,346 tok/s  ETA 12m34s",
]


def loss_curve(steps: int, every: int, start: float, floor: float) -> list[list[float]]:
    """A deterministic, decaying and slightly noisy loss curve."""
    import math

    return [[s, round(floor + (start - floor) * math.exp(-s / (steps / 4)) + 0.04 * math.sin(s), 4)]
            for s in range(every, steps + 1, every)]


def seed_training(db, ids: dict[str, int]) -> dict[str, int]:
    """On top of `seed`: the Ready adapter gets the finished fine-tune that made it (its curve and lineage),
    and a second fine-tune is running (step 120 of 400)."""
    logs = db.path.parent / "logs"
    done_log, live_log = logs / "job-2-finetune.log", logs / "job-3-finetune.log"
    done_log.write_text("\n".join(TRAINING_LOG[:3] + ["10:05:12 adapter written", "10:05:12 job succeeded"]) + "\n")
    live_log.write_text("\n".join(TRAINING_LOG) + "\n")
    with db.write() as session:
        adapter = session.get(Model, ids["adapter"])
        finished = Job(kind=JobKind.FINETUNE, state=JobState.SUCCEEDED, model_id=adapter.id, title="fine-tune",
                       log_path=str(done_log), progress=1.0, created_at=T0 + 1000, finished_at=T0 + 3600,
                       metrics_json=Job.dumps({"step": 300, "total_steps": 300, "epoch": 3.0, "loss": 0.9123,
                                               "eval_loss": 1.0412, "tokens_per_s": 2311.0,
                                               "curve": {"train": loss_curve(300, 5, 2.6, 0.9),
                                                         "eval": loss_curve(300, 30, 2.5, 1.04)}}))
        session.add(finished)
        session.flush()
        adapter.job_id = finished.id
        adapter.source = "finetune:Qwen2.5-0.5B-Instruct"
        adapter.meta_json = Model.dumps({
            "dataset": "/data/support.jsonl", "format": "OpenAI chat", "rows": {"train": 1900, "validation": 100},
            "hyperparameters": {"rank": 16, "alpha": 32, "learning_rate": 0.0002, "epochs": 3.0},
            "final_loss": 0.9123, "final_eval_loss": 1.0412,
            "evaluation": {"rows": 100, "tokens": 5210, "adapter": {"loss": 1.0388, "perplexity": 2.8258},
                           "base": {"loss": 1.7412, "perplexity": 5.7045}},
            "tokens_per_s": 2311.0})
        session.add(adapter)
        running = Model(name="support-bot-v2", kind=ModelKind.ADAPTER, state=ModelState.PENDING,
                        source="finetune:Qwen2.5-0.5B-Instruct", base_id=ids["base"], owns_path=True,
                        path="/data/modeldeck/models/support-bot-v2", created_at=T0 + 8500, updated_at=T0 + 8500)
        session.add(running)
        session.flush()
        job = Job(kind=JobKind.FINETUNE, state=JobState.RUNNING, model_id=running.id, title="fine-tune",
                  log_path=str(live_log), pid=os.getpid(), pid_started_at=psutil.Process().create_time(),
                  progress=0.3, eta_s=754.0, created_at=T0 + 8500,
                  metrics_json=Job.dumps({"phase": "training", "step": 120, "total_steps": 400, "epoch": 1.2,
                                          "loss": 1.3412, "eval_loss": 1.4021, "lr": 0.000171, "tokens_per_s": 2345.6,
                                          "curve": {"train": loss_curve(120, 2, 2.6, 1.2),
                                                    "eval": loss_curve(120, 40, 2.5, 1.35)}}))
        session.add(job)
        session.flush()
        running.job_id = job.id
    return ids | {"training": running.id}


def two_gpus(busy: int = 87):
    """What the ledger reads on a two-GPU box: GPU 0 serves the seeded deployment support-bot, GPU 1 is
    nearly filled by another user's training run. `busy`: GPU 0's utilisation."""
    from engine.gpus import Claim, Gpu, GpuProcess, ProcessInfo, ledger

    gpus = [Gpu(0, "NVIDIA H100 80GB HBM3", 81559, 41000, busy, 61, 402.5, 700.0, (GpuProcess(4242, 40960),),
                frozenset({1})),
            Gpu(1, "NVIDIA H100 80GB HBM3", 81559, 78000, 99, 74, 655.0, 700.0, (GpuProcess(5151, 77824),),
                frozenset({0}))]
    claims = [Claim("deployment support-bot", frozenset({0}), 4000, 1000.0)]
    processes = {4242: ProcessInfo(4242, "alice", "python -m engine.server --model Qwen2.5-0.5B-Instruct",
                                   ((4242, 1001.0), (4000, 1000.0))),
                 5151: ProcessInfo(5151, "bob", "torchrun --nproc-per-node 1 train.py --config big.yaml",
                                   ((5151, 900.0),))}
    return ledger(gpus, claims, processes)


def busy_history():
    """A minute and a half of a Ready deployment's load, read every 2 s: bursts of requests and quiet between."""
    import math

    from engine.load import LoadHistory, ServerLoad

    history = LoadHistory()
    requests = tokens = fast = slow = 0.0
    for n in range(46):
        wave = max(0.0, math.sin(n / 5))
        requests, tokens = requests + round(4 * wave), tokens + round(260 * wave)
        fast, slow = fast + round(3 * wave), slow + round(wave)
        history.add(ServerLoad(int(requests), int(tokens), ((0.05, fast), (0.25, fast + slow), (math.inf, fast + slow))),
                    1000.0 + 2 * n)
    return history
