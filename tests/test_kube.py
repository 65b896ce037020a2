"""Kubernetes targets without a cluster: every manifest validated strictly against the Kubernetes OpenAPI
schemas (kubernetes-validate, offline), the status mapping on pods as the API returns them, and the API
flow (create, 409, 403 with nothing left half-made, delete by labels, pods read back) against kmock, an
in-memory Kubernetes API emulator served over HTTP, with the test playing the controllers' part."""

from __future__ import annotations

import asyncio
import copy
import os

import pytest

from engine.backends import DeploySettings
from engine.errors import EngineError

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra brings kubernetes-validate")
pytest.importorskip("kubernetes", reason="the kubernetes extra is not installed")
pytest.importorskip("kmock", reason="the test extra brings kmock")

from engine.kube import cluster  # noqa: E402
from engine.kube.manifests import (  # noqa: E402
    LABEL_DEPLOYMENT,
    MANAGED_BY,
    ClusterDeploy,
    deployment_objects,
    in_cluster_url,
    k8s_name,
    to_yaml,
)
from engine.kube.status import server_state  # noqa: E402

K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships


def spec(name: str = "qwen-small", **settings) -> ClusterDeploy:
    return ClusterDeploy(name, "ml", "Qwen/Qwen2.5-0.5B-Instruct", "7ae5576", name,
                         DeploySettings(**settings), settings.get("tensor_parallel", 1), "sk-md-secret")


@pytest.mark.parametrize("variant", [
    spec(), spec(tensor_parallel=4, max_model_len=8192, dtype="bfloat16", gpu_memory_fraction=0.85),
    ClusterDeploy("Qwen2.5 Coder 7B!", "team-a", "Qwen/Qwen2.5-Coder-7B-Instruct", None, "coder", DeploySettings(),
                  1, "sk-md-x", hf_token="hf_secret", cache_size_gib=200, image="registry.local/vllm:v0.11"),
], ids=["default", "tensor-parallel", "token-and-own-image"])
def test_every_manifest_passes_the_strict_kubernetes_schemas(variant):
    objects = deployment_objects(variant)
    assert [o["kind"] for o in objects][-2:] == ["Deployment", "Service"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["labels"][MANAGED_BY] == "modeldeck"  # every object is traceable, nothing orphaned
        assert obj["metadata"]["labels"][LABEL_DEPLOYMENT] == k8s_name(variant.name, "")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    service = next(o for o in objects if o["kind"] == "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(variant.gpus)
    assert "--served-model-name" in container["args"] and variant.api_key not in container["args"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= container.keys()


def test_the_schemas_do_reject_what_is_wrong():
    """The validation above can fail: an unknown field, a missing selector and a wrong type are refused."""
    deployment = next(o for o in deployment_objects(spec()) if o["kind"] == "Deployment")
    unknown = copy.deepcopy(deployment)
    unknown["spec"]["replica"] = 1
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    for broken in (unknown, no_selector, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_names_yaml_and_the_in_cluster_url():
    assert k8s_name("Qwen2.5 Coder 7B!") == "md-qwen2-5-coder-7b" and len(k8s_name("x" * 200)) == 63
    text = to_yaml(deployment_objects(spec()))
    assert text.count("\n---\n") + text.startswith("---\n") == 4 and "kind: Service" in text
    assert in_cluster_url(spec()) == "http://md-qwen-small.ml.svc.cluster.local:8000/v1"


def pod(phase="Pending", conditions=(), containers=(), name="md-qwen-small-abc"):
    return {"metadata": {"name": name, "creationTimestamp": "2026-11-26T10:00:00Z"},
            "status": {"phase": phase, "conditions": list(conditions), "containerStatuses": list(containers)}}


@pytest.mark.parametrize(("pods", "expected"), [
    ([], ("pending", "creating the pod", None)),
    ([pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}])],
     ("pending", "not schedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.", None)),
    ([pod(conditions=[{"type": "PodScheduled", "status": "True"}],
          containers=[{"image": "vllm/vllm-openai:latest", "state": {"waiting": {"reason": "ContainerCreating"}}}])],
     ("pending", "creating the container", None)),
    ([pod(containers=[{"image": "vllm/vllm-openai:nope", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}])],
     ("failed", None, "cannot pull the image vllm/vllm-openai:nope (ImagePullBackOff): Back-off pulling image")),
    ([pod("Running", containers=[{"state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                  "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}])],
     ("failed", None, "the server keeps crashing (CrashLoopBackOff) (exit code 1): ValueError: bad model")),
    ([pod("Running", containers=[{"state": {"running": {}}, "lastState": {"terminated": {"reason": "OOMKilled"}}}])],
     ("failed", None, "OOMKilled: the server ran out of memory; lower the max model length or use more GPUs")),
    ([pod("Running", containers=[{"state": {"running": {}}}])], ("pending", "loading the model", None)),
    ([pod("Running", conditions=[{"type": "Ready", "status": "True"}], containers=[{"state": {"running": {}}}])],
     ("ready", None, None)),
], ids=["no-pod", "unschedulable", "creating", "image-pull", "crash-loop", "oom", "loading", "ready"])
def test_pods_map_to_the_lifecycle(pods, expected):
    found = server_state(pods, log_tail=lambda name: ["Traceback...", "ValueError: bad model", "exiting"])
    assert (found.state, found.phase, found.reason) == expected


@pytest.fixture
def emulator(kmock):
    for resource in ("batch/v1/jobs", "v1/configmaps", "v1/pods"):  # beyond what the manifests declare
        kmock.resources[resource] = {}
    return kmock


def client_for(kmock):
    return cluster.api_client(host=str(kmock.url).rstrip("/"))


def live(kmock) -> set[tuple[str, str]]:
    return {(key[0].plural, key[2]) for key in kmock.objects if not kmock.objects[key].deleted}


async def test_apply_refuses_a_taken_name_and_delete_removes_only_its_own(emulator):
    client = client_for(emulator)
    await asyncio.to_thread(cluster.apply, client, deployment_objects(spec("one")))
    await asyncio.to_thread(cluster.apply, client, deployment_objects(spec("two")))
    assert ("deployments", "md-one") in live(emulator) and ("services", "md-two") in live(emulator)
    with pytest.raises(EngineError, match=r"creating Secret md-one-api-key: it already exists in namespace 'ml'"):
        await asyncio.to_thread(cluster.apply, client, deployment_objects(spec("one")))
    removed = await asyncio.to_thread(cluster.delete_all, client, "ml", "one")
    assert sorted(removed) == ["Deployment/md-one", "PersistentVolumeClaim/md-one-cache", "Secret/md-one-api-key",
                               "Service/md-one"]
    assert {name for _, name in live(emulator)} == {"md-two", "md-two-cache", "md-two-api-key"}


async def test_a_forbidden_namespace_is_a_clear_message_and_nothing_half_made_stays(emulator):
    import kmock

    emulator["post /apis/apps/v1/namespaces/ml/deployments"] << kmock.Response(status=403, payload={
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
        "message": 'deployments.apps is forbidden: User "ada" cannot create resource "deployments" in "ml"'})
    client = client_for(emulator)
    with pytest.raises(EngineError, match=r"creating Deployment md-qwen-small: no permission in namespace 'ml' "
                                          r"\(403\): deployments.apps is forbidden"):
        await asyncio.to_thread(cluster.apply, client, deployment_objects(spec()))
    # The secret and the volume claim made before it were taken back. (kmock keeps a record of the refused
    # Deployment itself: it tracks every create, even one its reaction answered with 403.)
    assert {kind for kind, _ in live(emulator)} <= {"deployments"}


async def test_pods_are_read_back_and_mapped(emulator):
    client = client_for(emulator)
    labels = deployment_objects(spec())[-2]["spec"]["template"]["metadata"]["labels"]
    stranger = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "other", "namespace": "ml", "labels": {}},
                "spec": {"containers": [{"name": "x", "image": "busybox"}]}}
    ours = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "md-qwen-small-1", "namespace": "ml", "labels": labels},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
            # the scheduler's part, played by the test
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                           "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}}
    core = __import__("kubernetes").client.CoreV1Api(client)
    for body in (stranger, ours):
        await asyncio.to_thread(core.create_namespaced_pod, "ml", body)
    found = await asyncio.to_thread(cluster.pods, client, "ml", "qwen-small")
    assert [p["metadata"]["name"] for p in found] == ["md-qwen-small-1"]
    assert server_state(found).phase == "not schedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."


def test_an_unreachable_cluster_is_one_line():
    client = cluster.api_client(host="http://127.0.0.1:9")
    client.configuration.retries = 0
    with pytest.raises(EngineError, match=r"^creating Secret md-qwen-small-api-key: cannot reach the cluster"):
        cluster.apply(client, deployment_objects(spec()))


def test_contexts_come_from_the_kubeconfig(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert cluster.contexts() == ([], None)  # no kubeconfig: no Kubernetes target is offered
    config = tmp_path / "config"
    config.write_text("""
apiVersion: v1
kind: Config
clusters: [{name: c1, cluster: {server: "https://10.0.0.1:6443"}}]
users: [{name: u1, user: {token: t}}]
contexts: [{name: prod-gpu, context: {cluster: c1, user: u1, namespace: ml}},
           {name: staging, context: {cluster: c1, user: u1}}]
current-context: staging
""")
    monkeypatch.setenv("KUBECONFIG", str(config))
    assert cluster.contexts() == (["prod-gpu", "staging"], "staging")
    assert cluster.parse_target("prod-gpu/ml") == ("prod-gpu", "ml") and cluster.parse_target("staging") == ("staging", "default")
    with pytest.raises(EngineError, match="expected CONTEXT/NAMESPACE"):
        cluster.parse_target("/ml")


@pytest.mark.skipif(not os.environ.get("MODELDECK_TEST_KUBECONFIG"),
                    reason="no real cluster: set MODELDECK_TEST_KUBECONFIG to a kubeconfig to run this")
def test_a_real_cluster_accepts_and_removes_a_deployment(monkeypatch):
    monkeypatch.setenv("KUBECONFIG", os.environ["MODELDECK_TEST_KUBECONFIG"])
    _, current = cluster.contexts()
    namespace = os.environ.get("MODELDECK_TEST_NAMESPACE", "default")
    client = cluster.api_client(current)
    objects = deployment_objects(ClusterDeploy("md-ci-check", namespace, "HuggingFaceTB/SmolLM2-135M-Instruct", None,
                                               "smol", DeploySettings(), 1, "sk-md-ci"))
    try:
        cluster.apply(client, objects)
        assert cluster.pods(client, namespace, "md-ci-check") is not None
    finally:
        removed = cluster.delete_all(client, namespace, "md-ci-check")
    assert len(removed) == len(objects)


def test_deploy_dry_run_prints_valid_manifests_and_touches_nothing(db, hub):
    import subprocess
    import sys

    import yaml

    from engine import deployments, models
    from tests.conftest import settled

    model, _ = models.pull(db, "org/tiny")
    settled(db, model.id)
    result = subprocess.run([sys.executable, "-m", "tui.cli", "deploy", model.name, "--target", "prod-gpu/ml",
                             "--dry-run", "--tensor-parallel", "2", "--max-model-len", "4096"],
                            capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["Secret", "PersistentVolumeClaim", "Deployment", "Service"]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"]["namespace"] == "ml"
    args = objects[2]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "org/tiny" and args[args.index("--tensor-parallel-size") + 1] == "2"
    assert "keep it out of git" in result.stderr
    assert deployments.deployment_rows(db) == []  # nothing registered, nothing started
    refused = subprocess.run([sys.executable, "-m", "tui.cli", "deploy", model.name, "--dry-run"],
                             capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert refused.returncode == 1 and "give --target CONTEXT/NAMESPACE" in refused.stderr


KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{{name: emulator, cluster: {{server: "{url}"}}}}]
users: [{{name: ada, user: {{token: t}}}}]
contexts: [{{name: emu, context: {{cluster: emulator, user: ada, namespace: ml}}}}]
current-context: emu
"""


@pytest.fixture
def on_emulator(emulator, db, tmp_path, monkeypatch):
    """The kubeconfig points at the emulator; a Hub model is in Custom (the cluster downloads it itself)."""
    from catalog.schema import Model, ModelKind, ModelState

    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG.format(url=str(emulator.url).rstrip("/")))
    monkeypatch.setenv("KUBECONFIG", str(config))
    with db.write() as session:
        session.add(Model(name="qwen", kind=ModelKind.BASE, state=ModelState.READY, source="hub:Qwen/Qwen2.5-0.5B-Instruct",
                          repo_id="Qwen/Qwen2.5-0.5B-Instruct", revision="7ae5576", path=str(tmp_path)))
    return emulator


async def deployment_where(db, deployment_id, predicate, timeout=30):
    from engine import deployments, jobs

    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        await asyncio.to_thread(jobs.reconcile, db)
        row = (await asyncio.to_thread(deployments.deployment_rows, db, {deployment_id}))[0]
        if predicate(row):
            return row
        await asyncio.sleep(0.2)  # the emulator lives on this loop: let it answer the supervisor
    raise AssertionError(f"timed out; the deployment is {row.state.value} ({row.phase}, {row.reason})")


async def test_a_cluster_deployment_follows_its_pods_and_leaves_nothing_behind(db, on_emulator):
    import kubernetes

    from engine import deployments
    from engine.kube.manifests import labels

    deployment, _ = await asyncio.to_thread(deployments.deploy, db, "qwen",
                                            DeploySettings(target="emu/ml", tensor_parallel=2))
    assert deployment.backend == "kubernetes" and deployment.gpus == "2"
    assert deployment.endpoint.startswith("http://127.0.0.1:")  # where the port-forward will listen
    await deployment_where(db, deployment.id, lambda d: d.phase == "creating the pod")
    assert {("deployments", "md-qwen"), ("services", "md-qwen")} <= live(on_emulator)
    # The scheduler's part: no node has the GPUs.
    core = kubernetes.client.CoreV1Api(client_for(on_emulator))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "md-qwen-7f9", "namespace": "ml", "labels": labels("qwen", "server")},
           "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
           "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "message":
                                                          "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}}
    await asyncio.to_thread(core.create_namespaced_pod, "ml", pod)
    row = await deployment_where(db, deployment.id, lambda d: (d.phase or "").startswith("not schedulable"))
    assert row.phase == "not schedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    # The kubelet's part: scheduled, then the server crashes over and over.
    await asyncio.to_thread(core.patch_namespaced_pod, "md-qwen-7f9", "ml", {"status": {
        "phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
        "containerStatuses": [{"name": "vllm", "image": "vllm/vllm-openai:latest", "imageID": "", "ready": False,
                               "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                               "lastState": {"terminated": {"reason": "Error", "exitCode": 1}}}]}})
    failed = await deployment_where(db, deployment.id, lambda d: d.state.value == "failed")
    assert failed.reason.startswith("the server keeps crashing (CrashLoopBackOff) (exit code 1)")
    # Failed or stopped, its objects are gone from the cluster (the pod is the Deployment's to remove).
    await deployment_where(db, deployment.id, lambda d: not ({"deployments", "services", "secrets",
                                                             "persistentvolumeclaims"} & {k for k, _ in live(on_emulator)}))


async def test_stopping_a_cluster_deployment_deletes_its_objects(db, on_emulator):
    from engine import deployments

    deployment, _ = await asyncio.to_thread(deployments.deploy, db, "qwen", DeploySettings(target="emu/ml"))
    await deployment_where(db, deployment.id, lambda d: d.phase == "creating the pod")
    assert ("deployments", "md-qwen") in live(on_emulator)
    stopping = asyncio.create_task(asyncio.to_thread(deployments.stop, db, deployment.id))
    while not stopping.done():
        await asyncio.sleep(0.1)  # the supervisor deletes through the emulator, which runs on this loop
    assert (await stopping).state.value == "stopped"
    assert live(on_emulator) == set()
    with pytest.raises(EngineError, match="no context 'nope' in the kubeconfig; it has: emu"):
        await asyncio.to_thread(deployments.plan, db, "qwen", DeploySettings(target="nope/ml"))


async def test_a_killed_cluster_supervisor_says_its_objects_remain_and_delete_removes_them(db, on_emulator):
    import signal

    from engine import deployments, jobs

    deployment, job = await asyncio.to_thread(deployments.deploy, db, "qwen", DeploySettings(target="emu/ml"))
    await deployment_where(db, deployment.id, lambda d: d.phase == "creating the pod")
    os.kill((await asyncio.to_thread(jobs.get, db, job.id)).pid, signal.SIGKILL)
    failed = await deployment_where(db, deployment.id, lambda d: d.state.value == "failed")
    assert failed.reason.endswith("its objects are still on the cluster until you delete this deployment")
    assert ("deployments", "md-qwen") in live(on_emulator)
    removing = asyncio.create_task(asyncio.to_thread(deployments.delete, db, deployment.id))
    while not removing.done():
        await asyncio.sleep(0.1)  # the emulator answers on this loop
    await removing
    assert live(on_emulator) == set()
