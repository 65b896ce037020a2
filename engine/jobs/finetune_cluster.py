"""The fine-tune job's cluster half: a fine-tune run as a Kubernetes Job, followed from here.

It applies the Job and what it needs (engine/kube/manifests.py: the spec and the dataset in ConfigMaps,
volumes for the model cache and the adapter), then follows it: Pending with the cluster's reason (not
schedulable, pulling the image...), then the run's own progress, read from the pod's log where the
entry point prints it as events (engine/jobs/reported.py), into the same metrics a local fine-tune
writes: step, loss curve, tokens/s, ETA. On success the adapter is registered Ready, its files on its
volume on the cluster. Whatever ends the run, the Job and its inputs are deleted; the adapter's volume
stays (and, after a failure or a stop, the model cache too, so a retry resumes from the last checkpoint
without downloading the base again).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from catalog.schema import Model
from engine.errors import EngineError
from engine.finetune import cluster_job
from engine.jobs.finetune import LINEAGE_IN_META, Reporter, Stopping
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.reported import parse
from engine.kube import cluster
from engine.kube.manifests import KEPT_AFTER_SUCCESS, KEPT_FOR_A_RETRY, finetune_objects
from engine.kube.status import finetune_state

POLL_S = 2.0
LOG_WINDOW_S = 120  # each read asks for the log's last two minutes; lines already read are skipped
PENDING_TIMEOUT_S = 3600.0  # a pod that has not started within an hour (no GPU frees up, say) fails


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


class FinetuneOnCluster:
    def __init__(self, ctx: JobContext):
        self.ctx, self.params = ctx, ctx.params
        self.on = self.params["cluster"]
        self.context, self.namespace = cluster.parse_target(self.on["target"])
        self.stopping = Stopping()
        self.client = None
        self.spec = None
        self.train_curve: list[list[float]] = []
        self.eval_curve: list[list[float]] = []
        self.metrics: dict = {}
        self.outcome: dict | None = None  # the run's last word: done, failed or cancelled
        self.read_to: dict[str, tuple[str, str]] = {}  # per pod, the newest log line read
        self.phase: tuple[str, float] | None = None  # what is happening, and since when
        self.run_phase: str | None = None  # the last phase the run itself told

    def run(self) -> None:
        with self.ctx.db.read() as session:
            base = session.get(Model, self.params["base_id"])
            name = session.get(Model, self.ctx.model_id).name
        if base is None:
            raise JobFailure("the base model was deleted")
        try:
            self.spec = cluster_job(name, self.on, base, Path(self.params["dataset"]),
                                    self.params["hyperparameters"], self.params.get("attempt", 1))
        except OSError as exc:
            raise JobFailure(f"cannot read the dataset {self.params['dataset']}: {exc.strerror}") from exc
        self.set_phase("creating its Job on the cluster")
        try:
            self.client = cluster.api_client(self.context)
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

    def set_phase(self, name: str) -> None:
        if self.phase is None or self.phase[0] != name:
            self.phase = (name, time.monotonic())
        self.ctx.report(metrics={"phase": name, "elapsed_s": round(time.monotonic() - self.phase[1])})

    def follow(self) -> bool:
        """Until the Job ends: True when it succeeded; a failure or a stop raises."""
        waiting_since, outage = time.monotonic(), cluster.Outage()
        while True:
            self.stopping.check()
            try:
                job = cluster.job(self.client, self.namespace, self.spec.job_name)
                pods = cluster.pods(self.client, self.namespace, self.spec.owner)
                self.read_log(pods)
                now = finetune_state(job, pods, lambda pod: cluster.last_log_lines(self.client, self.namespace, pod))
                outage.over()
            except EngineError as exc:  # the run goes on on the cluster meanwhile
                if outage.lasted_too_long():
                    raise JobFailure(str(exc)) from None
                self.ctx.log(f"{exc}; trying again")
                self.pause()
                continue
            if now.state == "succeeded":
                if self.outcome is None or "done" not in self.outcome:
                    raise JobFailure("the Job completed, but its log does not say where the adapter is "
                                     "(was it modeldeck's fine-tune entry point?)")
                return True
            if now.state == "failed":
                told = (self.outcome or {}).get("failed")
                raise JobFailure(told or now.reason)
            if now.state == "pending":
                self.set_phase(now.phase)
                if time.monotonic() - waiting_since > PENDING_TIMEOUT_S:
                    raise JobFailure(f"the pod did not start within {PENDING_TIMEOUT_S / 60:.0f} min: {now.phase}")
            else:
                waiting_since = time.monotonic()
                if self.metrics.get("phase") != "training":  # the run's own phase, with its time
                    self.set_phase(self.run_phase or "starting the fine-tune")
            self.pause()

    def pause(self) -> None:
        for _ in range(int(POLL_S / 0.2)):  # a stop is seen within 0.2 s
            if self.stopping.requested:
                return
            time.sleep(0.2)

    def read_log(self, pods: list[dict]) -> None:
        """The newest pod's log lines not read yet: events become progress, the rest goes to this job's log."""
        if not pods:
            return
        pod = max(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")["metadata"]["name"]
        seen = self.read_to.get(pod)
        for line in cluster.log_lines(self.client, self.namespace, pod, LOG_WINDOW_S if seen else None):
            stamp = log_time(line)
            if stamp is None or (seen is not None and stamp <= seen):
                continue
            seen = self.read_to[pod] = stamp
            text = line.split(" ", 1)[1] if " " in line else ""
            event = parse(text)
            if event is None:
                print(text, flush=True)
            else:
                self.take(event)

    def take(self, event: dict) -> None:
        if "phase" in event:
            self.run_phase = event["phase"]
            self.metrics["phase"] = event["phase"]
            self.set_phase(event["phase"])
        elif "metrics" in event:
            for which, curve in (("train", self.train_curve), ("eval", self.eval_curve)):
                for step, loss in event.get("points", {}).get(which, []):
                    if not curve or step > curve[-1][0]:  # a resumed run tells its history again
                        Reporter.add_point(curve, step, loss)
            self.metrics = event["metrics"]
            self.ctx.report(self.metrics | {"curve": {"train": self.train_curve, "eval": self.eval_curve}},
                            **event.get("fields", {}))
        else:
            self.outcome = event

    def succeed(self) -> None:
        lineage = self.outcome["done"]
        with self.ctx.db.read() as session:
            meta = session.get(Model, self.ctx.model_id).meta
        meta.update({k: lineage[k] for k in LINEAGE_IN_META if k in lineage})
        self.ctx.log(f"adapter written to {self.spec.adapter_folder} on volume {self.spec.adapter_volume}")
        self.ctx.succeed(size_bytes=lineage.get("size_bytes"), meta_json=Model.dumps(meta))

    def cleanup(self, keep: tuple[str, ...]) -> None:
        """Delete the Job (its pod saves a checkpoint as it stops) and its inputs; keep the volumes asked."""
        try:
            removed = cluster.delete_all(self.client, self.namespace, self.spec.owner, keep_roles=keep)
            self.ctx.log("deleted from the cluster: " + (", ".join(removed) or "nothing left")
                         + f"; kept: {', '.join(keep)}")
        except EngineError as exc:
            self.ctx.log(f"could not delete everything from the cluster: {exc}")
