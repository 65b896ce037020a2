"""The dashboard's CPU use while idle with the GPU ledger and the load history live, against the same
dashboard with both off, in one run (target: under 1% of one core more), and the ledger's refresh cost.

Each variant is a headless dashboard in its own process on its own MODELDECK_HOME, left idle for --seconds;
its CPU time (user + system, from the process table) over that wall time is its share of one core. Runs
alternate, so drift in the machine hits both.
- live: the ledger read every 2 s (NVML where there is a GPU; where there is none, readings of two GPUs
  with four processes go through the rest of the ledger: the live work from the database, the process
  table, who holds what) and one Ready deployment (the real built-in server on a tiny random Llama) whose
  /metrics are read every 2 s into its load history, shown on the Active deployments screen.
- off: the same dashboard on the same database, with the ledger finding no GPU and no /metrics read.
Run: python bench/idle_cpu.py [--seconds 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import fresh_home

CHILD = """
import os, sys, time
from tui.app import ModelDeckApp
from engine import gpus

ledger_on, load_on = sys.argv[1] in ("live", "ledger"), sys.argv[1] in ("live", "load")
if ledger_on and not gpus.list_gpus():  # no GPU here: readings as NVML would give them, through the real ledger
    pids = [os.getpid(), os.getppid()]
    readings = [gpus.Gpu(i, "NVIDIA H100 80GB HBM3", 81559, 40000 + i, 50, 60, 300.0, 700.0,
                         tuple(gpus.GpuProcess(pid, 1000) for pid in pids)) for i in range(2)]

    def reader(db):
        with db.read() as session:
            return gpus.ledger_in(session, readings)
else:
    reader = None if ledger_on else (lambda db: [])


class Idle(ModelDeckApp):
    gpu_reader = staticmethod(reader) if reader else None

    def poll_load(self):
        if load_on:
            super().poll_load()

    def on_data_loaded(self, message):
        super().on_data_loaded(message)
        self.call_after_refresh(lambda: self.switch_mode("deployments"))
        print("ready", flush=True)

Idle().run(headless=True, size=(120, 40))
"""


def tiny_deployment(home: Path) -> int:
    """A Ready deployment of a tiny random Llama (the real built-in server) in this MODELDECK_HOME."""
    import engine
    from engine import deployments, models
    from engine.backends import DeploySettings
    from tests.tinymodel import make_tiny_llama

    db = engine.start()
    models.import_path(db, make_tiny_llama(home / "tiny"), "tiny")
    deployment, _ = deployments.deploy(db, "tiny", DeploySettings())
    end = time.monotonic() + 180
    while time.monotonic() < end:
        [row] = deployments.deployment_rows(db, {deployment.id})
        if row.state.value != "pending":
            break
        time.sleep(0.5)
    assert row.state.value == "ready", row.reason
    return deployment.id


def idle_share(variant: str, seconds: float) -> float:
    """The share of one core the dashboard takes, idle, over `seconds` after its first load."""
    import psutil

    child = subprocess.Popen([sys.executable, "-c", CHILD, variant], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1], env=os.environ | {"TERM": "xterm-256color"})
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(3)  # past the start-up work
        process = psutil.Process(child.pid)
        before, began = process.cpu_times(), time.monotonic()
        time.sleep(seconds)
        after, wall = process.cpu_times(), time.monotonic() - began
        return (after.user + after.system - before.user - before.system) / wall
    finally:
        child.kill()
        child.wait()


def ledger_cost(reads: int = 200) -> float:
    """Seconds one refresh of the ledger takes in this process (NVML or the readings, the database, the
    process table)."""
    import engine
    from engine import gpus

    db = engine.start()
    readings = gpus.list_gpus() or [gpus.Gpu(i, "H100", 81559, 40000, 50, 60, 300.0, 700.0,
                                             (gpus.GpuProcess(os.getpid(), 1000),)) for i in range(2)]
    began = time.perf_counter()
    for _ in range(reads):
        with db.read() as session:
            gpus.ledger_in(session, gpus.list_gpus() or readings)
    return (time.perf_counter() - began) / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--each", action="store_true", help="also the ledger alone and the load history alone")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    home = fresh_home()
    deployed = tiny_deployment(home)
    variants = ("live", "ledger", "load", "off") if args.each else ("live", "off")
    shares = {variant: [] for variant in variants}
    try:
        for _ in range(args.runs):
            for variant in variants:
                shares[variant].append(idle_share(variant, args.seconds))
        cost = ledger_cost()
    finally:
        import engine
        from engine import deployments

        deployments.stop(engine.start(), deployed)
    from engine import gpus

    live, off = statistics.median(shares["live"]), statistics.median(shares["off"])
    where = "NVML" if gpus.list_gpus() else "no GPU here: two GPUs' readings through the rest of the ledger"
    print(f"idle CPU, share of one core over {args.seconds:.0f} s, median of {args.runs} ({where}):")
    print(f"  ledger + load history live: {100 * live:.2f}%   ({', '.join(f'{100 * x:.2f}' for x in shares['live'])})")
    print(f"  both off:                   {100 * off:.2f}%   ({', '.join(f'{100 * x:.2f}' for x in shares['off'])})")
    for variant in variants[1:-1]:
        print(f"  {variant} alone:{' ' * (21 - len(variant))}{100 * statistics.median(shares[variant]):.2f}%")
    print(f"  more: {100 * (live - off):+.2f} points of one core (target: under 1); ratio live/off {live / off:.2f}")
    print(f"ledger refresh: {1000 * cost:.2f} ms a reading; at one reading every 2 s: {100 * cost / 2:.3f}% of a core")


if __name__ == "__main__":
    main()
