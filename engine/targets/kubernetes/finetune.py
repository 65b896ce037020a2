"""A fine-tune on Kubernetes: the run as a Job on the cluster, followed from here by the fine-tune job.

It applies the Job and what it needs (engine/targets/kubernetes/manifests.py: the spec in a ConfigMap, the dataset in Secrets,
volumes for the model cache and the adapter), then follows it: Pending with the cluster's reason (not
schedulable, pulling the image...), then the run's own progress, read from the pod's log where the
entry point prints it as events (engine/jobs/reported.py), into the same metrics a local fine-tune
writes: step, loss curve, tokens/s, ETA. On success the adapter is registered Ready, its files on its
volume on the cluster. Whatever ends the run, the Job and its inputs are deleted; the adapter's volume
stays (and, after a failure or a stop, the model cache too, so a retry resumes from the last checkpoint
without downloading the base again).
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

from catalog.schema import Model
from engine.errors import EngineError
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.reported import RunEvents
from engine.jobs.training import Stopping, succeed_with
from engine.targets.kubernetes import cluster, cluster_job
from engine.targets.kubernetes.manifests import KEPT_AFTER_SUCCESS, KEPT_FOR_A_RETRY, finetune_objects
from engine.targets.kubernetes.status import finetune_state, newest
from engine.targets.outage import Outage

POLL_S = 2.0
LOG_MARGIN_S = 30  # each read of the log goes back this much before the last read
PENDING_TIMEOUT_S = 3600.0  # a pod that has not started within an hour (no GPU frees up, say) fails
LAST_POD_TIMEOUT_S = 300.0  # a retry waits this long for the last run's pod to stop writing the volume


def log_time(line: str) -> tuple[str, str] | None:
    """The kubelet's timestamp at the start of a log line, as a sortable (seconds, nanoseconds) pair:
    RFC 3339 drops trailing zeros of the fraction, so the text itself does not sort."""
    stamp = line.split(" ", 1)[0]
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        datetime.fromisoformat(whole)
    except ValueError:
        return None
    return whole, fraction.ljust(9, "0")


def fresh_lines(lines: list[str], seen: tuple | None) -> tuple[list[str], tuple | None]:
    """The lines of a read not read before, without their timestamps, and the new mark. A line is known by
    its timestamp and its place among the lines with that same timestamp: some runtimes (CRI-O) stamp a
    whole buffer of lines alike."""
    fresh, count = [], {}
    for line in lines:
        stamp = log_time(line)
        if stamp is None:
            continue
        count[stamp] = count.get(stamp, -1) + 1
        key = (stamp, count[stamp])
        if seen is not None and key <= seen:
            continue
        seen = key
        fresh.append(line.split(" ", 1)[1] if " " in line else "")
    return fresh, seen


class FinetuneOnCluster:
    def __init__(self, ctx: JobContext):
        self.ctx, self.params = ctx, ctx.params
        with self.ctx.db.read() as session:
            adapter = session.get(Model, self.ctx.model_id)
        self.name, self.on = adapter.name, adapter.meta["cluster"]  # where its run is, kept with the adapter
        self.context, self.namespace = cluster.parse_target(self.on["target"])
        self.stopping = Stopping()
        self.client = None
        self.spec = None
        self.events = RunEvents(ctx, self.set_phase)
        self.following: str | None = None  # the pod whose log is read
        self.read_to: tuple | None = None  # where its log was read to (see fresh_lines)
        self.read_at: float | None = None  # when it was last read
        self.phase: tuple[str, float] | None = None  # what is happening, and since when

    def run(self) -> None:
        name = self.name
        with self.ctx.db.read() as session:
            base = session.get(Model, self.params["base_id"])
        if base is None:
            raise JobFailure("the base model was deleted")
        try:
            self.spec = cluster_job(name, self.on, base, Path(self.params["dataset"]),
                                    self.params["hyperparameters"], self.params.get("attempt", 1))
        except OSError as exc:
            raise JobFailure(f"cannot read the dataset {self.params['dataset']}: {exc.strerror}") from exc
        try:
            self.client = cluster.api_client(self.context)
            if self.params.get("attempt", 1) > 1:
                self.clear_the_last_run()
            self.set_phase("creating its Job on the cluster")
            cluster.apply(self.client, finetune_objects(self.spec), reuse_roles=KEPT_FOR_A_RETRY)
        except EngineError as exc:
            raise JobFailure(str(exc)) from None
        self.ctx.log(f"Job {self.spec.job_name} created in {self.namespace} (context {self.context}), "
                     f"image {self.spec.image}")
        succeeded = False
        try:
            succeeded = self.follow()
        finally:
            self.cleanup(KEPT_AFTER_SUCCESS if succeeded else KEPT_FOR_A_RETRY)
        self.succeed()

    def clear_the_last_run(self) -> None:
        """A retry: what the last run left (its Job, if its supervisor was killed; its inputs) goes, and its
        pod must have stopped writing the volume before a new one starts on it."""
        cluster.delete_all(self.client, self.namespace, self.spec.owner, keep_roles=KEPT_FOR_A_RETRY)
        start = time.monotonic()
        while cluster.pods(self.client, self.namespace, self.spec.owner):
            self.stopping.check()
            self.set_phase("waiting for the last run's pod to stop")
            if time.monotonic() - start > LAST_POD_TIMEOUT_S:
                raise JobFailure(f"the last run's pod is still there after {LAST_POD_TIMEOUT_S / 60:.0f} min; "
                                 "retry once it is gone")
            self.pause()

    def set_phase(self, name: str) -> None:
        if self.phase is None or self.phase[0] != name:
            self.phase = (name, time.monotonic())
        self.ctx.report(metrics={"phase": name, "elapsed_s": round(time.monotonic() - self.phase[1])})

    def follow(self) -> bool:
        """Until the Job ends: True when it succeeded; a failure or a stop raises."""
        waiting_since, outage = time.monotonic(), Outage()
        while True:
            self.stopping.check()
            try:
                job = cluster.job(self.client, self.namespace, self.spec.job_name)
                pods = cluster.pods(self.client, self.namespace, self.spec.owner)
                self.read_log(pods)
                warning = cluster.warning(self.client, self.namespace, self.spec.job_name) if not pods else None
                now = finetune_state(job, pods, lambda pod: cluster.last_log_lines(self.client, self.namespace, pod),
                                     warning)
                if now.state == "succeeded" and "done" not in (self.events.outcome or {}):
                    self.read_log(pods, whole=True)  # its last lines may have come after the last read
                outage.over()
            except EngineError as exc:  # the run goes on on the cluster meanwhile
                if outage.lasted_too_long():
                    raise JobFailure(str(exc)) from None
                self.ctx.log(f"{exc}; trying again")
                self.pause()
                continue
            if now.state == "succeeded":
                if self.events.outcome is None or "done" not in self.events.outcome:
                    raise JobFailure("the Job completed, but its log does not say where the adapter is "
                                     "(was it modeldeck's fine-tune entry point?)")
                return True
            if now.state == "failed":
                told = (self.events.outcome or {}).get("failed")
                raise JobFailure(told or now.reason)
            if now.state == "pending":
                self.set_phase(now.phase)
                if time.monotonic() - waiting_since > PENDING_TIMEOUT_S:
                    raise JobFailure(f"the pod did not start within {PENDING_TIMEOUT_S / 60:.0f} min: {now.phase}")
            else:
                waiting_since = time.monotonic()
                if not self.events.training:  # the run's own phase, with its time
                    self.set_phase(self.events.run_phase or "starting the fine-tune")
            self.pause()

    def pause(self) -> None:
        for _ in range(int(POLL_S / 0.2)):  # a stop is seen within 0.2 s
            if self.stopping.requested:
                return
            time.sleep(0.2)

    def read_log(self, pods: list[dict], whole: bool = False) -> None:
        """The newest pod's log lines not read yet: events become progress, the rest goes to this job's log.
        Each read asks for the log since shortly before the last one."""
        pod = newest(pods)
        if pod is None:
            return
        name = pod["metadata"]["name"]
        if name != self.following:  # a new pod (the last was evicted): its own log, its own outcome
            self.following, self.read_to, self.read_at, self.events.outcome = name, None, None, None
        since = None if whole or self.read_at is None else \
            math.ceil(time.monotonic() - self.read_at) + LOG_MARGIN_S
        started = time.monotonic()
        fresh, self.read_to = fresh_lines(cluster.log_lines(self.client, self.namespace, name, since), self.read_to)
        self.read_at = started
        for text in fresh:
            self.events.line(text)

    def succeed(self) -> None:
        lineage = self.events.outcome["done"]
        self.ctx.log(f"adapter written to {self.spec.adapter_folder} on volume {self.spec.adapter_volume}")
        succeed_with(self.ctx, lineage, lineage.get("size_bytes"))

    def cleanup(self, keep: tuple[str, ...]) -> None:
        """Delete the Job (its pod saves a checkpoint as it stops) and its inputs; keep the volumes asked."""
        cluster.clean_up(self.client, self.namespace, self.spec.owner, self.ctx.log, keep_roles=keep)
