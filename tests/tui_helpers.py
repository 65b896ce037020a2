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
        for name, state, phase, reason, port in [
            ("support-bot", DeploymentState.READY, None, None, 8001),
            ("qwen-small", DeploymentState.PENDING, "loading weights", None, 8002),
            ("broken", DeploymentState.FAILED, None, "server exited with code 1", 8003),
        ]:
            session.add(Deployment(model_id=base.id, name=name, backend="transformers", state=state, phase=phase,
                                   reason=reason, endpoint=f"http://127.0.0.1:{port}/v1", served_name=name,
                                   api_key="sk-md-0123456789abcdef", created_at=T0, updated_at=T0))
    return {"base": base.id, "adapter": adapter.id, "pending": pending.id, "failed": failed.id}
