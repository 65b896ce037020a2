"""Deploy to Ready on the SLURM target against the same model deployed on this machine, side by side in one
run: SLURM's scheduling overhead, in seconds and as a ratio.

    python bench/slurm_overhead.py [--rounds 3] [--model PATH]

As root it starts the tests' single-node cluster (tests/slurmcluster.py) in a temporary folder and stops it
afterwards; with SLURM_CONF set to a cluster's configuration, it uses that one (partition: --partition).
The model is the tests' tiny Llama unless --model names a model folder that this machine and the compute
nodes both read. Each round deploys on this machine, then on SLURM, each to Ready, then stops it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_home


def to_ready(db, target: str, settings: dict) -> float:
    from catalog.schema import DeploymentState
    from engine import deployments, jobs
    from engine.backends import DeploySettings

    start = time.monotonic()
    deployment, _job = deployments.deploy(db, "bench", DeploySettings(target=target, **settings))
    while True:
        jobs.reconcile(db)
        row = deployments.deployment_rows(db, {deployment.id})[0]
        if row.state != DeploymentState.PENDING:
            break
        time.sleep(0.05)
    took = time.monotonic() - start
    if row.state != DeploymentState.READY:
        sys.exit(f"{target or 'this machine'}: {row.state.value}: {row.reason}")
    deployments.stop(db, deployment.id)
    deployments.delete(db, deployment.id)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="a model folder (default: the tests' tiny Llama)")
    parser.add_argument("--partition", default="debug")
    args = parser.parse_args()
    fresh_home()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    cluster = None
    if not os.environ.get("SLURM_CONF"):
        from tests import slurmcluster

        cluster = slurmcluster.start(Path(tempfile.mkdtemp(prefix="modeldeck-bench-slurm-")))
        os.environ.update(cluster.env)
    import engine
    from engine import models

    db = engine.start()
    if args.model:
        model = Path(args.model)
    else:
        from tests.tinymodel import make_tiny_llama

        model = make_tiny_llama(Path(os.environ["MODELDECK_HOME"]).parent / "tiny-llama")
    models.import_path(db, model, "bench")
    local, slurm = [], []
    try:
        for round_ in range(1, args.rounds + 1):
            local.append(to_ready(db, "", {"backend": "transformers", "gpus": "cpu"}))
            slurm.append(to_ready(db, f"slurm:{args.partition}", {"backend": "transformers", "gpus": "0",
                                                                 "options": {"time": "10"}}))
            print(f"round {round_}: this machine {local[-1]:.2f} s, SLURM {slurm[-1]:.2f} s", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    here, there = statistics.median(local), statistics.median(slurm)
    print(f"\ndeploy to Ready, median of {args.rounds} ({model.name}):")
    print(f"  this machine  {here:6.2f} s")
    print(f"  SLURM         {there:6.2f} s")
    print(f"  overhead      {there - here:+6.2f} s  (ratio SLURM / this machine: {there / here:.2f})")


if __name__ == "__main__":
    main()
