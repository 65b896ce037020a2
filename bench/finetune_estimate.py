"""The fine-tune dialog's time estimate against the run it predicts: for each model, the CPU guess made
before a run (engine/estimates.py: this CPU's measured matmul speed and the model's size) and the
training time the run then took, measured by the engine itself, side by side (target: within 2× either
way; CPU_EFFICIENCY is fitted from what this prints).
Run: python bench/finetune_estimate.py [--model FOLDER ...] [--steps 8]

Without --model it builds random Llamas of three sizes (seconds); a real model folder (SmolLM2-135M
converted by `modeldeck import`, say) can be named instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_home
from finetune_throughput import make_dataset, make_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"small": (256, 4, 8, 1024), "medium": (512, 8, 8, 1536), "large": (768, 12, 12, 2048)}
HYPERPARAMETERS = dict(batch_size=4, grad_accum=2, val_split=0, max_length=256)


def guess_and_run(db, name: str, model_dir: Path, data: Path, steps: int) -> tuple[float, float]:
    from engine import estimates, finetune, jobs, models
    from engine.datasets import token_stats_in_subprocess
    from engine.hyperparameters import Hyperparameters
    from engine.localmodel import model_config

    models.import_path(db, model_dir, name)
    hp = Hyperparameters(max_steps=steps, **HYPERPARAMETERS)
    plan = finetune.plan(db, name, data, hp, "cpu")
    counted = token_stats_in_subprocess(model_dir, data, plan.hyperparameters.max_length, cpu_speed=True)
    seen = estimates.rows_seen(plan.steps, hp.batch_size, hp.grad_accum, plan.train_rows, hp.epochs, hp.max_steps)
    guess = estimates.estimate(seen * counted.stats.mean_trained, None, estimates.model_params(model_config(model_dir)[1]),
                               counted.cpu_flops, validation=False)
    model, job = finetune.start(db, plan, f"{name}-lora")
    while not jobs.get(db, job.id).state.is_terminal():
        jobs.reconcile(db)
        time.sleep(1.0)
    done = models.get_model(db, f"{name}-lora").model
    if done.state.value != "ready":
        sys.exit(f"the fine-tune of {name} failed: {done.reason}")
    lineage = json.loads((Path(done.path) / "modeldeck.json").read_text())
    return guess.seconds, lineage["train_runtime_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", type=Path, help="a model folder (else three random Llamas)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    home = fresh_home()
    import engine

    os.environ["MODELDECK_HOME"] = str(home / "home")
    db = engine.start()
    data = make_dataset(home / "data.jsonl")
    folders = {path.name: path for path in args.model} if args.model else {
        size: make_model(Path(tempfile.mkdtemp(dir=home)) / size, SIZES[size]) for size in SIZES}
    print(f"{'model':<24} {'guessed':>9} {'measured':>9} {'measured / guessed':>19}")
    for name, folder in folders.items():
        guessed, measured = guess_and_run(db, name.replace(".", "-")[:40], folder, data, args.steps)
        print(f"{name:<24} {guessed:8.1f}s {measured:8.1f}s {measured / guessed:19.2f}", flush=True)


if __name__ == "__main__":
    main()
