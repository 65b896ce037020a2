"""A deployment on Kubernetes (backend "kubernetes"), supervised from here by its serving job.

It applies the deployment's objects (engine/targets/kubernetes/manifests.py), follows its pods through the same
lifecycle as a local server (Pending with the cluster's reason, Ready, Failed with the reason and the
crashed container's last log lines), and makes the endpoint reachable here through a port-forward it
opens and keeps open itself (`kubectl port-forward` as its child, in its process group). Once the
forwarded /health answers and one tiny completion succeeds, the deployment is Ready. Whatever ends it
(a stop, a failure, this process being killed and reconciled), every object carrying the deployment's
labels is deleted: nothing is left holding GPUs on the cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import httpx2 as httpx

from catalog.schema import Deployment, Model
from engine.backends import DeploySettings
from engine.errors import EngineError
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.serving import healthy, ready, set_phase, warm_up
from engine.targets.kubernetes import cluster, cluster_deploy
from engine.targets.kubernetes.manifests import PORT, ClusterDeploy, deployment_objects
from engine.targets.kubernetes.status import ClusterState, server_state
from engine.targets.outage import Outage

POLL_S = 2.0  # how often the pods are read
READY_TIMEOUT_S = 3600.0  # pulling a vLLM image and a large model can take long on a cold node
FORWARD_TIMEOUT_S = 60.0
FORWARD_RETRY_S = 5.0


def serve(ctx: JobContext, deployment: Deployment, model: Model, base: Model | None,
          adapters: list[tuple[str, Model]]) -> None:
    """Until stopped or failed; whatever ends it, every object of the deployment is deleted."""
    on_cluster = OnCluster(ctx, deployment, model, base, adapters)
    try:
        on_cluster.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop must not interrupt the cleanup
        on_cluster.cleanup()


def cluster_spec(deployment: Deployment, model: Model, base: Model | None,
                 adapters: list[tuple[str, Model]] = ()) -> tuple[ClusterDeploy, str]:
    """The deployment's objects' description, and its kubeconfig context."""
    settings = DeploySettings.of(deployment)
    context, _namespace = cluster.parse_target(settings.target)
    try:
        spec = cluster_deploy(deployment.name, settings.target, model, base, deployment.served_name, settings,
                              deployment.api_key, adapters)
    except EngineError as exc:
        raise JobFailure(str(exc)) from None
    return spec, context


class OnCluster:
    def __init__(self, ctx: JobContext, deployment: Deployment, model: Model, base: Model | None,
                 adapters: list[tuple[str, Model]] = ()):
        self.ctx, self.deployment = ctx, deployment
        self.spec, self.context = cluster_spec(deployment, model, base, adapters)
        self.client = None
        self.forward: subprocess.Popen | None = None
        self.applied = False
        self.owner = self.spec.owner
        self.outage = Outage()
        self.last_state = ClusterState("pending", "creating the pod")

    def set_phase(self, phase: str) -> None:
        set_phase(self.ctx, self.deployment.id, phase)

    def run(self) -> None:
        """Until stopped or failed (both end by an exception)."""
        try:
            self.client = cluster.api_client(self.context)
            self.set_phase("creating its objects on the cluster")
            # Before, not after: a stop while objects are being created must still delete those made.
            self.applied = True
            cluster.apply(self.client, deployment_objects(self.spec))
        except EngineError as exc:
            raise JobFailure(str(exc)) from None
        self.ctx.log(f"applied to {self.spec.namespace} in context {self.context}")
        self.wait_for_pods()
        self.open_forward()
        base_url = self.deployment.endpoint.removesuffix("/v1")
        with httpx.Client() as client:
            self.wait_for_health(client, base_url)
            self.set_phase("warming up")
            warm_up(client, base_url, self.deployment)
        ready(self.ctx, self.deployment.id)
        self.ctx.log(f"ready at {self.deployment.endpoint} (forwarded from service {self.owner.base_name})")
        self.watch()

    def state(self):
        """The pods' state; while the cluster's API fails to answer (for less than the outage's grace),
        the last state known, so a blip neither fails nor tears down a deployment that is serving."""
        try:
            pods = cluster.pods(self.client, self.spec.namespace, self.owner)
            self.outage.over()
        except EngineError as exc:
            if self.outage.lasted_too_long():
                raise JobFailure(str(exc)) from None
            self.ctx.log(f"{exc}; trying again")
            return self.last_state
        self.last_state = server_state(pods, lambda pod: cluster.last_log_lines(self.client, self.spec.namespace, pod))
        return self.last_state

    def wait_for_pods(self) -> None:
        start = time.monotonic()
        while True:
            now = self.state()
            if now.state == "ready":
                return
            if now.state == "failed":
                raise JobFailure(now.reason)
            self.set_phase(now.phase)
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise JobFailure(f"not Ready on the cluster within {READY_TIMEOUT_S / 60:.0f} min: {now.phase}")
            time.sleep(POLL_S)

    def open_forward(self) -> None:
        """`kubectl port-forward` to the service, on the local port of the deployment's endpoint. Its
        output goes to this job's log; its last line is kept, to say why it ended."""
        local = self.deployment.endpoint.removesuffix("/v1").rsplit(":", 1)[1]
        self.forward_said = ""
        argv = [shutil.which("kubectl") or "kubectl", "--context", self.context, "-n", self.spec.namespace,
                "port-forward", "--address", "127.0.0.1", f"svc/{self.owner.base_name}", f"{local}:{PORT}"]
        if os.environ.get("KUBECONFIG") is None and cluster.kubeconfig_path() is not None:
            argv[1:1] = ["--kubeconfig", str(cluster.kubeconfig_path())]
        self.ctx.log("port-forward: " + " ".join(argv))
        try:
            self.forward = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, errors="replace")
        except OSError as exc:  # no kubectl: said in the phase, and tried again (it may be installed meanwhile)
            self.forward, self.forward_said = None, f"kubectl: {exc.strerror}; install kubectl on PATH"
            return

        def relay(stream) -> None:  # drained all along: kubectl blocks on a full pipe
            for line in stream:
                print(line, end="", flush=True)
                if line.strip():
                    self.forward_said = line.strip()

        threading.Thread(target=relay, args=(self.forward.stdout,), name="port-forward", daemon=True).start()

    def forward_ended(self) -> bool:
        return self.forward is None or self.forward.poll() is not None

    def wait_for_health(self, client: httpx.Client, base_url: str) -> None:
        """Until the forwarded /health answers. A port-forward that fails is opened again: the server is
        Ready on the cluster, and a problem here (kubectl, this machine's network) is no reason to tear it
        down; the phase says what kubectl said, and stopping the deployment is the user's to choose."""
        self.set_phase("opening the port-forward")
        opened = time.monotonic()
        while True:
            if self.forward_ended():
                said = self.forward_said or f"exit code {self.forward.returncode}"
                self.set_phase(f"the port-forward failed ({said}); trying again")
                time.sleep(FORWARD_RETRY_S)
                if (now := self.state()).state == "failed":
                    raise JobFailure(now.reason)
                self.open_forward()
                opened = time.monotonic()
            elif healthy(client, base_url):
                return
            elif time.monotonic() - opened > FORWARD_TIMEOUT_S:
                self.set_phase(f"the port-forward does not answer /health after {FORWARD_TIMEOUT_S:.0f} s; "
                               "still trying")
            time.sleep(0.5)

    def watch(self) -> None:
        """Ready until the pods fail; a port-forward that drops (a pod restarted) is opened again."""
        while True:
            time.sleep(POLL_S)
            now = self.state()
            if now.state == "failed":
                raise JobFailure(now.reason)
            if self.forward_ended() and now.state == "ready":
                self.ctx.log("the port-forward ended; opening it again")
                self.open_forward()

    def cleanup(self) -> None:
        """End the port-forward and delete every object of the deployment (whatever ended it)."""
        if self.forward is not None and self.forward.poll() is None:
            self.forward.terminate()
            try:
                self.forward.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.forward.kill()
        if self.client is not None and self.applied:
            cluster.clean_up(self.client, self.spec.namespace, self.owner, self.ctx.log)
