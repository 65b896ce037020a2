"""Human-readable numbers shared by the CLI and the dashboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from catalog.states import DeploymentState, JobKind, ModelState

if TYPE_CHECKING:
    from catalog.schema import Job
    from engine.gpus import Gpu, GpuState
    from engine.models import DeletePlan


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def human_params(params: int) -> str:
    if params >= 999.5e6:
        return f"{params / 1e9:.1f}B"
    return f"{params / 1e6:.0f}M"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def human_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


# How a model's recorded details are labelled (anything else: its key, in words).
META_LABELS = {"gpus": "GPUs", "tokens_per_s": "Tokens/s", "train_runtime_s": "Training time (s)",
               "final_loss": "Final loss", "final_eval_loss": "Final validation loss",
               "evaluation": "Held-out rows", "gguf": "GGUF file", "base_model": "Base model",
               "target_modules": "Target modules", "evaluations": "Evaluations", "when_done": "When done"}


def meta_label(key: str) -> str:
    return META_LABELS.get(key, key.replace("_", " ").capitalize())


def meta_value(key: str, value: object) -> str:
    """A recorded detail as the screens and `show` write it."""
    if key == "evaluation" and isinstance(value, dict):
        return describe_evaluation(value)
    if key == "evaluations" and isinstance(value, list):
        return "\n".join(describe_scored(result) for result in value)
    return human_value(value)


def describe_scored(result: dict) -> str:
    """An evaluation on a dataset (engine/evaluate.py) in a line: 'support.jsonl: loss 1.04 (perplexity 2.83), base
    2.31 (10.1): 0.28× the base's perplexity; 100 rows, 5,210 tokens'."""
    def one(scored: dict) -> str:
        ppl = scored.get("perplexity")
        return f"{scored['loss']:.4g} (perplexity {ppl:.4g})" if ppl is not None else f"{scored['loss']:.4g}"

    model, base = result["model"], result.get("base")
    text = f"{Path(result['dataset']).name}: loss {one(model)}"
    if base is not None:
        text += f", base {one(base)}"
        if model.get("perplexity") and base.get("perplexity"):
            text += f": {model['perplexity'] / base['perplexity']:.2f}× the base's perplexity"
    rows = result["rows"]
    text += f"; {rows:,} row{'s' if rows != 1 else ''}, {result['tokens']:,} tokens"
    if result.get("left_out"):
        text += f" ({result['left_out']} left out: nothing to score within {result['max_length']} tokens)"
    return text


def describe_evaluation(evaluation: dict) -> str:
    """'adapter loss 1.04 (perplexity 2.83), base 2.31 (10.1): 0.45× the base's perplexity; 2 held-out rows,
    54 tokens'"""
    def one(result: dict) -> str:
        ppl = result.get("perplexity")
        return f"{result['loss']:.4g} (perplexity {ppl:.4g})" if ppl is not None else f"{result['loss']:.4g}"

    adapter, base = evaluation["adapter"], evaluation["base"]
    ratio = (f": {adapter['perplexity'] / base['perplexity']:.2f}× the base's perplexity"
             if adapter.get("perplexity") and base.get("perplexity") else "")
    rows = evaluation["rows"]
    return (f"adapter loss {one(adapter)}, base {one(base)}{ratio}; {rows} held-out row{'s' if rows != 1 else ''}, "
            f"{evaluation['tokens']} tokens")


def human_value(value: object) -> str:
    """A model's recorded detail (lineage, hyperparameters) on one line: lists joined, mappings as k=v."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={human_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(human_value, value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


BAR_WIDTH = 10


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = fraction * width
    full = int(filled)
    partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < width else ""
    return ("█" * full + partial).ljust(width, "·")


def job_progress(job: Job, detail: str = "short") -> str:
    """A job's progress at three levels of detail: "tiny" ('42%'), "short" ('42% 12.3 MB/s ETA 1m02s'),
    "long" (with a bar and the bytes); its phase (and time in it) when bytes are not counted."""
    if job.bytes_total:
        done = job.bytes_done or 0
        fraction = done / job.bytes_total
        if detail == "tiny":
            return f"{fraction:.0%}"
        rate = f" {human_bytes(job.rate)}/s" if job.rate else ""
        eta = f" ETA {human_duration(job.eta_s)}" if job.eta_s is not None else ""
        if detail == "short":
            return f"{fraction:.0%}{rate}{eta}"
        return f"{progress_bar(fraction)} {fraction:.0%}  {human_bytes(done)} of {human_bytes(job.bytes_total)}{rate}{eta}"
    metrics = job.loads(job.metrics_json, {})
    if metrics.get("total_steps") and "elapsed_s" not in metrics:
        return training_progress(metrics, job.eta_s, detail)
    phase = metrics.get("phase") or ("starting" if job.state.value == "queued" else "working")
    elapsed = metrics.get("elapsed_s")
    if elapsed is not None and job.progress is not None:  # a phase that counts its steps (a conversion's tensors)
        eta = f" ETA {human_duration(job.eta_s)}" if job.eta_s is not None and job.progress < 1 else ""
        if detail == "tiny":
            return f"{job.progress:.0%}"
        if detail == "short":  # the count first: a narrow column cuts the phase's name, not the bar
            return f"{progress_bar(job.progress, 6)} {job.progress:.0%}{eta} {phase}"
        return f"{phase}: {progress_bar(job.progress)} {job.progress:.0%}  {human_duration(elapsed)} so far{eta}"
    if detail == "tiny":
        return ""
    return f"{phase} ({human_duration(elapsed)})" if elapsed is not None else phase


def training_progress(metrics: dict, eta_s: float | None, detail: str) -> str:
    """A fine-tune's progress: '42%', '42% loss 1.234 ETA 3m02s', or with a bar, steps, epoch, losses."""
    step, total = metrics.get("step", 0), metrics["total_steps"]
    fraction = step / total
    if detail == "tiny":
        return f"{fraction:.0%}"
    loss = f" loss {metrics['loss']:.3f}" if metrics.get("loss") is not None else ""
    eta = f" ETA {human_duration(eta_s)}" if eta_s is not None and step < total else ""
    if step == 0 and eta_s is None:  # a CPU's first step can take a minute: say that it is under way
        eta = " first step…"
    if detail == "short":
        return f"{progress_bar(fraction, 6)} {fraction:.0%}{loss}{eta}"
    parts = [f"step {step:,}/{total:,}", f"epoch {metrics.get('epoch', 0):.2f}"]
    if metrics.get("loss") is not None:
        parts.append(f"loss {metrics['loss']:.4f}")
    if metrics.get("eval_loss") is not None:
        parts.append(f"val {metrics['eval_loss']:.4f}")
    if metrics.get("tokens_per_s"):
        parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
    return f"{progress_bar(fraction)} {fraction:.0%}  " + " · ".join(parts) + eta


def state_text(state: ModelState, reason: str | None, job: Job | None, detail: str = "short",
               cancelled: bool = False, deployed: bool = False) -> str:
    """How a model's state reads everywhere: 'Ready', 'Failed: <reason>' ('Failed' when tiny),
    'Pending <progress>'."""
    if state == ModelState.READY and job is not None and job.kind == JobKind.EVALUATE:  # scored on a dataset: Ready
        return "Evaluating" if detail == "tiny" else f"Ready · evaluating {job_progress(job, detail)}".rstrip()
    if state == ModelState.READY and deployed:  # a live deployment serves it now
        return "Deployed" if detail == "tiny" else "Ready · deployed"
    if state == ModelState.READY:
        return "Ready"
    if state == ModelState.FAILED and cancelled:  # asked for: not a failure
        return "Cancelled" if detail != "long" else f"Cancelled: {reason} (retry starts it again)"
    if state == ModelState.FAILED:
        return "Failed" if detail == "tiny" else f"Failed: {reason}"
    progress = job_progress(job, detail) if job is not None else "waiting"
    return f"Pending {progress}".rstrip()


def deployment_state_text(state: DeploymentState, phase: str | None, reason: str | None,
                          ends_at: float | None = None, now: float | None = None) -> str:
    """How a deployment's state reads everywhere: 'Pending (loading weights)', 'Ready', 'Ready · 58m left'
    (its target ends it then: a batch job's time limit), 'Failed: <reason>'."""
    text = state.value.capitalize()
    if state == DeploymentState.READY and ends_at is not None:
        text += f" · {human_duration(ends_at - (time.time() if now is None else now))} left"
    if state == DeploymentState.PENDING and phase:
        text += f" ({phase})"
    if state == DeploymentState.FAILED and reason:
        text += f": {reason}"
    return text


BACKEND_LABELS = {"transformers": "built-in", "vllm": "vLLM", "external": "external", "kubernetes": "kubernetes"}


def backend_label(backend: str) -> str:
    """The built-in server runs on transformers; it is called what the drawer calls it."""
    return BACKEND_LABELS.get(backend, backend)


def listening_on(deployment) -> tuple[str, bool]:
    """Where a deployment's server listens ("0.0.0.0:8001", or where its target says: "vm12:41729"), and
    whether that is beyond this machine."""
    from engine import targets

    return targets.of_deployment(deployment).listening(deployment)


def model_location(model) -> str | None:
    """Where a model's files are: a folder here, or where the target that keeps them has them (a volume of
    a cluster, for a fine-tune run there)."""
    from engine import targets

    return targets.home_of(model).location(model)


def delete_consequence(plan: DeletePlan) -> str:
    """What deleting frees, for the confirmation (dashboard and CLI alike)."""
    model = plan.model
    ended = len(plan.ended_deployments)
    history = (f" Its {ended} stopped or failed deployment{'s' if ended > 1 else ''} and their chats go too."
               if ended else "")
    running = " Its running job is cancelled first." if plan.running_jobs else ""
    from engine import targets

    if (there := targets.home_of(model).delete_consequence(model)) is not None:
        return f"{there}{running}{history}"
    if plan.frees_bytes is None:
        return f"Its files in {model.path} are not modeldeck's and stay where they are.{history}"
    if plan.frees_bytes:
        return f"This frees {human_bytes(plan.frees_bytes)} on disk.{running}{history}"
    return f"Any partial files are removed.{running}{history}"


def masked_key(key: str | None) -> str:
    """An API key as screens show it: enough to tell keys apart, not enough to use one."""
    if not key:
        return "—"
    return key[:6] + "…" + key[-2:] if len(key) > 10 else "…"


def gib(mb: float | None) -> str:
    return "—" if mb is None else f"{mb / 1024:.1f}"


def gpu_usage(gpu: Gpu) -> list[str]:
    """A GPU's load as the ledger's columns: utilisation, memory used/total GiB, temperature, power."""
    return [f"{gpu.utilization}%" if gpu.utilization is not None else "—",
            f"{gib(gpu.memory_used_mb)}/{gib(gpu.memory_total_mb)} GiB",
            f"{gpu.temperature_c}°C" if gpu.temperature_c is not None else "—",
            f"{gpu.power_w:.0f}/{gpu.power_limit_w:.0f} W" if gpu.power_w is not None and gpu.power_limit_w
            else (f"{gpu.power_w:.0f} W" if gpu.power_w is not None else "—")]


def held_by(state: GpuState, commands: bool = True) -> str:
    """Who holds a GPU, in one line: modeldeck's work by name, other processes by pid and user (and command),
    each with the memory it uses; 'free' when nobody does."""
    parts = []
    for holder in state.holders:
        what = holder.what if commands or holder.ours else \
            f"pid {','.join(map(str, holder.pids))}" + (f" ({holder.user})" if holder.user else "")
        parts.append(what + (f" {gib(holder.memory_mb)} GiB" if holder.memory_mb is not None else ""))
    return "; ".join(parts) or "free"
