"""How long a fine-tune will take, said before it starts, so nobody starts a 42-minute CPU run by accident.

From a measured run when there is one: the tokens per second of the newest fine-tune of the same base on
the same kind of device (every run reports it, its validations and checkpoints included). Otherwise a
guess on this machine's CPU: its matrix-multiply speed, measured in the dialog's token-count subprocess
(the only place that may import torch), and the model's size; the share of that speed a LoRA step gets
(CPU_EFFICIENCY) was calibrated on real runs (bench/finetune_estimate.py prints guess against measure).
A GPU run with nothing measured has no guess: the speeds of GPUs and of their kernels vary too widely.

Light: no torch at import; measure_cpu_flops() imports it and runs in that subprocess only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from sqlmodel import select

from catalog import Database
from catalog.schema import Job, JobKind
from engine.format import human_duration

# A LoRA step costs about 4 × params FLOPs a token: 2 forward, 2 for the activation gradients (the base's
# weights are frozen: none for theirs). CPU_EFFICIENCY: the share of the CPU's matmul speed a step reaches.
CPU_EFFICIENCY = 0.5  # bench/finetune_estimate.py here: measured / guessed 0.86-1.4 over four models
VALIDATION_SHARE = 0.1  # the pacing keeps validations under a tenth of a run's time


@dataclass(frozen=True)
class RunEstimate:
    seconds: float
    basis: str  # what the figure rests on, said beside it

    def describe(self) -> str:
        return f"about {human_duration(self.seconds)} of training ({self.basis})"


def model_params(config: dict) -> int | None:
    """The weights a token passes through (the projections and the output head), from config.json's
    language model part; None when the config does not say."""
    h, i, layers = config.get("hidden_size"), config.get("intermediate_size"), config.get("num_hidden_layers")
    if not (h and i and layers):
        return None
    heads = config.get("num_attention_heads") or 1
    kv = (config.get("num_key_value_heads") or heads) / heads
    return int(layers * (2 * h * h + 2 * h * h * kv + 3 * h * i) + (config.get("vocab_size") or 0) * h)


def rows_seen(steps: int, batch_size: int, grad_accum: int, train_rows: int, epochs: float, max_steps: int) -> int:
    """Rows the trainer reads in the whole run: its steps' batches, never more than the epochs hold."""
    per_step = batch_size * grad_accum
    if max_steps:
        return steps * per_step
    return min(steps * per_step, math.ceil(epochs * train_rows))


def measured_speed(db: Database, base_id: int, on_cpu: bool, target: str) -> tuple[float, str] | None:
    """Tokens per second of the newest fine-tune of this base on this target and kind of device (CPU or
    GPU), with what it was: None when none has reported a speed yet."""
    with db.read() as session:
        runs = session.exec(select(Job).where(Job.kind == JobKind.FINETUNE).order_by(Job.id.desc()).limit(200)).all()
    for job in runs:
        params = job.params
        if params.get("base_id") != base_id or (params.get("gpus") == "cpu") != on_cpu:
            continue
        if (params.get("target") or "") != (target or ""):
            continue
        speed = json.loads(job.metrics_json or "{}").get("tokens_per_s") or 0
        if speed > 0:
            return speed, f"job {job.id}"
    return None


def estimate(tokens: float, measured: tuple[float, str] | None, params: int | None, cpu_flops: float | None,
             validation: bool) -> RunEstimate | None:
    """The run's time: from the measured speed, else the CPU guess; None when neither is at hand."""
    if tokens <= 0:
        return None
    if measured is not None:
        speed, what = measured
        return RunEstimate(tokens / speed, f"{speed:,.0f} tokens/s, as {what} ran")
    if params and cpu_flops:
        speed = CPU_EFFICIENCY * cpu_flops / (4 * params)
        seconds = tokens / speed * (1 + VALIDATION_SHARE if validation else 1)
        return RunEstimate(seconds, f"a guess from this CPU's speed: {tokens:,.0f} tokens at about {speed:,.0f}/s")
    return None


def measure_cpu_flops(seconds: float = 0.3) -> float:
    """This CPU's float32 matrix-multiply speed in FLOP/s, with torch's threads as a run would have them."""
    import time

    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b  # the first call sets up the threads
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * 1024**3 * count / elapsed
