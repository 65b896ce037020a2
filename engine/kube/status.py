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


def server_state(pods: list[dict], log_tail: Callable[[str], list[str]] = lambda pod: []) -> ClusterState:
    """`log_tail(pod_name)` gives a crashed container's last lines."""
    if not pods:
        return ClusterState("pending", "creating the pod")
    pod = max(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")  # the newest
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
