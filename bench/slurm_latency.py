"""A SLURM job's state change → its row on screen, p95 (target: under 2 s), with the controller calls per
minute, for 20 jobs followed at once.

    python bench/slurm_latency.py [--jobs 20] [--toggles 3]

As root it starts the tests' single-node cluster (tests/slurmcluster.py) in a temporary folder and stops it
afterwards. 20 deployments are submitted held (--hold) to the `gpu` partition, each asking for both GPUs,
which a job of the bench's own keeps: none of them runs. The bench then changes each job's state in SLURM
in turn — `scontrol release` (SLURM's reason: waiting for GPUs, or behind higher priority jobs), `scontrol
uhold` (held) — and the dashboard (headless, on Active deployments) records when the row shows it. squeue
calls are counted by modeldeck's shared queue snapshot, over the measured minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_home, percentile


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--toggles", type=int, default=3, help="state changes per job")
    args = parser.parse_args()
    fresh_home()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import slurmcluster

    cluster = slurmcluster.start(Path(tempfile.mkdtemp(prefix="modeldeck-bench-slurm-")))
    os.environ.update(cluster.env)
    try:
        await measure(cluster, args.jobs, args.toggles)
    finally:
        cluster.stop()


async def measure(cluster, count: int, toggles: int) -> None:
    import engine
    from engine import deployments, models
    from engine.backends import DeploySettings
    from engine.targets.slurm.queue import Queue
    from tests.tinymodel import make_tiny_llama
    from tui.app import ModelDeckApp
    from tui.widgets.live_table import LiveTable

    db = engine.start()
    models.import_path(db, make_tiny_llama(Path(os.environ["MODELDECK_HOME"]).parent / "tiny"), "bench")
    cluster.command("sbatch", "--partition=gpu", "--gres=gpu:2", "--time=60", "--output=/dev/null",
                    "--wrap", "sleep 3600")  # holds both GPUs: the deployments wait
    started = []
    for i in range(count):
        deployment, _ = deployments.deploy(db, "bench", DeploySettings(
            target="slurm:gpu", gpus="2", backend="transformers", options={"time": "30", "sbatch": "--hold"}),
            name=f"held-{i}")
        started.append(deployment.id)
    app = ModelDeckApp(db)
    seen: dict[tuple[int, str], float] = {}
    upsert = LiveTable.upsert

    def recording(self, key, cells):
        upsert(self, key, cells)
        if key in app.store.deployments:
            text = str(getattr(cells[3], "plain", cells[3]))
            seen.setdefault((key, "held" if "held" in text else "released"), time.monotonic())

    LiveTable.upsert = recording
    async with app.run_test(size=(160, 60)) as pilot:
        await pilot.press("3")
        jobs = await held_batch_jobs(db, started, pilot)
        queue = Queue(Path(os.environ["MODELDECK_HOME"]))
        calls_before, began = queue.calls()[0], time.monotonic()
        latencies = []
        for _ in range(toggles):
            for words, verb in (("released", "release"), ("held", "uhold")):
                for dep_id, job_id in jobs.items():
                    seen.pop((dep_id, words), None)
                    cluster.command("scontrol", verb, job_id)
                    changed = time.monotonic()
                    while (dep_id, words) not in seen:
                        await pilot.pause(0.02)
                        if time.monotonic() - changed > 30:
                            raise SystemExit(f"batch job {job_id}: not {words} on screen after 30 s")
                    latencies.append(seen[(dep_id, words)] - changed)
        minutes = (time.monotonic() - began) / 60
        calls = queue.calls()[0] - calls_before
    LiveTable.upsert = upsert
    for dep_id in started:
        deployments.stop(db, dep_id)
    print(f"{count} deployments followed at once, {len(latencies)} state changes in SLURM (hold / release):")
    print(f"  change → row on screen: p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
          f"max {max(latencies):.2f} s (target: p95 under 2 s)")
    print(f"  squeue calls by modeldeck: {calls} in {minutes:.1f} min = {calls / minutes:.0f} a minute, for all "
          f"{count} jobs (one per poll, not one per job: {count * 60:.0f} a minute if each asked every second)")


async def held_batch_jobs(db, deployment_ids: list[int], pilot) -> dict[int, str]:
    """Each deployment's batch job, once submitted and shown held."""
    import json

    from engine import deployments, jobs

    found: dict[int, str] = {}
    end = time.monotonic() + 120
    while len(found) < len(deployment_ids) and time.monotonic() < end:
        for row in deployments.deployment_rows(db, set(deployment_ids)):
            slurm_job = json.loads(jobs.get(db, row.job_id).metrics_json or "{}").get("slurm_job")
            if slurm_job and "held" in (row.phase or ""):
                found[row.id] = slurm_job
        await pilot.pause(0.2)
    if len(found) < len(deployment_ids):
        raise SystemExit(f"only {len(found)} of {len(deployment_ids)} batch jobs were submitted and held")
    return found


if __name__ == "__main__":
    asyncio.run(main())
