"""A deployment's pods, as modeldeck's lifecycle: Pending with the reason the cluster gives (not
schedulable: not enough GPUs; pulling the image; creating the container; loading the model), Ready when a
pod is ready, Failed with the reason (CrashLoopBackOff with the last log lines, ImagePullBackOff,
OOMKilled). Pure: it reads pod dicts as the API returns them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.logs import tail_reason

PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
CONFIG_FAILURES = ("CreateContainerConfigError", "CreateContainerError")


@dataclass
class ClusterState:
    state: str  # pending | ready | failed
    phase: str | None = None  # a Pending one's: what the cluster is doing
    reason: str | None = None  # a Failed one's


def newest(pods: list[dict]) -> dict | None:
    """The pod created last (a Deployment's or a Job's replacement for an earlier one)."""
    return max(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", default=None)


def server_state(pods: list[dict], log_tail: Callable[[str], list[str]] = lambda pod: []) -> ClusterState:
    """`log_tail(pod_name)` gives a crashed container's last lines."""
    if not pods:
        return ClusterState("pending", "creating the pod")
    pod = newest(pods)
    status = pod.get("status") or {}
    name = pod.get("metadata", {}).get("name", "?")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    if conditions.get("Ready", {}).get("status") == "True":
        return ClusterState("ready")
    scheduled = conditions.get("PodScheduled", {})
    if scheduled.get("status") == "False":
        why = scheduled.get("message") or scheduled.get("reason") or "no node fits it"
        return ClusterState("pending", f"not schedulable: {why}")
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        last = (container.get("lastState") or {}).get("terminated") or {}
        reason, message = waiting.get("reason"), waiting.get("message") or ""
        if last.get("reason") == "OOMKilled":
            return ClusterState("failed", reason="OOMKilled: the server ran out of memory; lower the max model "
                                                 "length or use more GPUs")
        if reason == "CrashLoopBackOff":
            tail = tail_reason(log_tail(name))
            code = f" (exit code {last['exitCode']})" if "exitCode" in last else ""
            return ClusterState("failed", reason=f"the server keeps crashing (CrashLoopBackOff){code}"
                                                 + (f": {tail}" if tail else ""))
        if reason in PULL_FAILURES:
            return ClusterState("failed", reason=f"cannot pull the image {container.get('image', '')} "
                                                 f"({reason}): {message}".rstrip(": "))
        if reason in CONFIG_FAILURES:
            return ClusterState("failed", reason=f"{reason}: {message}".rstrip(": "))
        if reason == "ContainerCreating":
            return ClusterState("pending", "creating the container")
        if reason:
            return ClusterState("pending", f"{reason[0].lower()}{reason[1:]}: {message}".rstrip(": "))
        if "running" in (container.get("state") or {}):
            return ClusterState("pending", "loading the model")
    if status.get("phase") == "Pending":
        return ClusterState("pending", "pulling the image" if conditions.get("PodScheduled") else "scheduling")
    return ClusterState("pending", (status.get("phase") or "starting").lower())


def finetune_state(job: dict | None, pods: list[dict], log_tail: Callable[[str], list[str]] = lambda pod: [],
                   warning: str | None = None) -> ClusterState:
    """A fine-tune Job and its pods: pending (with the cluster's reason), running, succeeded, or failed
    with the reason (OOMKilled, or the crashed container's exit code and last lines). A pod that cannot
    pull its image fails the fine-tune: the Job itself would wait for ever. `warning`: the Job's newest
    Warning event, which says why it has no pod (a quota, an admission policy)."""
    if job is None:
        return ClusterState("failed", reason="its Job was deleted from the cluster")
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []}
    if conditions.get("Complete", {}).get("status") == "True":
        return ClusterState("succeeded")
    pod = newest(pods)
    if conditions.get("Failed", {}).get("status") == "True":
        return ClusterState("failed", reason=_why_it_ended(pod, log_tail) or conditions["Failed"].get("message")
                            or conditions["Failed"].get("reason") or "the Job failed")
    if pod is None:
        return ClusterState("pending", f"the Job cannot create its pod: {warning}" if warning else "creating the pod")
    if any("running" in (c.get("state") or {}) for c in (pod.get("status") or {}).get("containerStatuses") or []):
        return ClusterState("running")
    now = server_state([pod], log_tail)
    return now if now.state == "failed" else ClusterState("pending", now.phase)


def _why_it_ended(pod: dict | None, log_tail: Callable[[str], list[str]]) -> str | None:
    for container in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        ended = (container.get("state") or {}).get("terminated") or {}
        if ended.get("reason") == "OOMKilled":
            return "OOMKilled: the fine-tune ran out of memory; lower the batch size or the max length (or use QLoRA)"
        if ended.get("exitCode"):
            tail = tail_reason(log_tail(pod.get("metadata", {}).get("name", "?")))
            return f"the fine-tune exited with code {ended['exitCode']}" + (f": {tail}" if tail else "")
    return None
