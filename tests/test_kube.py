"""Kubernetes targets without a cluster: every manifest validated strictly against the Kubernetes OpenAPI
schemas (kubernetes-validate, offline), the status mapping on pods as the API returns them, and the API
flow (create, 409, 403 with nothing left half-made, delete by labels, pods read back) against kmock, an
in-memory Kubernetes API emulator served over HTTP, with the test playing the controllers' part."""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path

import pytest

from catalog.schema import ModelState
from engine import models
from engine.backends import DeploySettings
from engine.errors import EngineError

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the test extra brings kubernetes-validate")
pytest.importorskip("kubernetes", reason="the kubernetes extra is not installed")
pytest.importorskip("kmock", reason="the test extra brings kmock")

from engine.targets.kubernetes import cluster  # noqa: E402
from engine.targets.kubernetes.manifests import (  # noqa: E402
    MANAGED_BY,
    ClusterDeploy,
    Owner,
    deployment_objects,
    in_cluster_url,
    k8s_name,
    to_yaml,
)
from engine.targets.kubernetes.status import server_state  # noqa: E402

# Clusters in service: the oldest still supported by most providers to the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.32.0", "1.34.0", "1.37.0")


def validate_strictly(obj: dict) -> None:
    """Valid for every Kubernetes version above, strictly (no unknown fields)."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


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
        validate_strictly(obj)
        assert obj["metadata"]["labels"][MANAGED_BY] == "modeldeck"  # every object is traceable, nothing orphaned
        assert obj["metadata"]["labels"]["modeldeck.dev/deployment"] == k8s_name(variant.name, "")
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
        for version in K8S_VERSIONS:
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(broken, version, strict=True)


def test_names_yaml_and_the_in_cluster_url():
    from engine.targets.kubernetes.manifests import finetune_objects

    assert k8s_name("Qwen2.5 Coder 7B!") == "md-qwen2-5-coder-7b"
    long_a, long_b = k8s_name("x" * 200 + "a"), k8s_name("x" * 200 + "b")
    assert len(long_a) == 50 and long_a != long_b  # room for suffixes; cut names stay apart
    text = to_yaml(deployment_objects(spec()))
    assert text.count("\n---\n") + text.startswith("---\n") == 4 and "kind: Service" in text
    assert "&id" not in text + to_yaml(finetune_objects(finetune_spec(gpus=2)))  # plain YAML: no anchors
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
    removed = await asyncio.to_thread(cluster.delete_all, client, "ml", spec("one").owner)
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
    found = await asyncio.to_thread(cluster.pods, client, "ml", spec().owner)
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
    # Without a namespace, a target takes its context's own; a namespace Kubernetes would refuse is refused.
    assert cluster.check_target("prod-gpu") == ("prod-gpu", "ml") and cluster.check_target("staging") == ("staging", "default")
    assert cluster.check_target("prod-gpu/team-a") == ("prod-gpu", "team-a")
    with pytest.raises(EngineError, match="namespace 'ML_bad': Kubernetes takes lowercase letters"):
        cluster.parse_target("prod-gpu/ML_bad")


@pytest.mark.skipif(not os.environ.get("MODELDECK_TEST_KUBECONFIG"),
                    reason="no real cluster: set MODELDECK_TEST_KUBECONFIG to a kubeconfig to run this")
def test_a_real_cluster_accepts_and_removes_a_deployment_and_a_finetune(monkeypatch):
    from engine.targets.kubernetes.manifests import finetune_objects

    monkeypatch.setenv("KUBECONFIG", os.environ["MODELDECK_TEST_KUBECONFIG"])
    _, current = cluster.contexts()
    namespace = os.environ.get("MODELDECK_TEST_NAMESPACE", "default")
    client = cluster.api_client(current)
    objects = deployment_objects(ClusterDeploy("md-ci-check", namespace, "HuggingFaceTB/SmolLM2-135M-Instruct", None,
                                               "smol", DeploySettings(), 1, "sk-md-ci"))
    run = finetune_spec("md-ci-check", gpus=0)
    run.namespace = namespace
    for owner, made in ((Owner.deployment("md-ci-check", "sk-md-ci"), objects), (run.owner, finetune_objects(run))):
        try:
            cluster.apply(client, made)  # the real API server's own validation and admission
        finally:
            removed = cluster.delete_all(client, namespace, owner)
        assert len(removed) == len(made)


def test_deploy_dry_run_prints_valid_manifests_and_touches_nothing(db, hub):
    import subprocess
    import sys

    import yaml

    from engine import deployments, models
    from tests.conftest import settled

    model, _ = models.pull(db, "org/tiny")
    settled(db, model.id)
    result = subprocess.run([sys.executable, "-m", "tui.cli", "deploy", model.name, "--target", "prod-gpu/ml",
                             "--dry-run", "--tensor-parallel", "2", "--max-model-len", "4096",
                             "--image", "vllm/vllm-openai:v0.11.0"],
                            capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["Secret", "PersistentVolumeClaim", "Deployment", "Service"]
    for obj in objects:
        validate_strictly(obj)
        assert obj["metadata"]["namespace"] == "ml"
    [container] = objects[2]["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "org/tiny" and args[args.index("--tensor-parallel-size") + 1] == "2"
    assert container["image"] == "vllm/vllm-openai:v0.11.0"
    assert "keep it out of git" in result.stderr
    assert deployments.deployment_rows(db) == []  # nothing registered, nothing started
    refused = subprocess.run([sys.executable, "-m", "tui.cli", "deploy", model.name, "--dry-run"],
                             capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert refused.returncode == 1 and "give --target CONTEXT/NAMESPACE" in refused.stderr
    here = subprocess.run([sys.executable, "-m", "tui.cli", "deploy", model.name, "--image", "vllm/vllm-openai:v0.11.0"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert here.returncode == 1 and "a vLLM image is for a Kubernetes target" in here.stderr


def test_the_users_hugging_face_token_goes_to_the_cluster_as_a_secret(db, hub):
    """Found where huggingface_hub finds it: the file `hf auth login` writes, or HF_TOKEN before it."""
    import subprocess
    import sys

    import yaml

    from engine import models
    from tests.conftest import settled

    model, _ = models.pull(db, "org/tiny")
    settled(db, model.id)

    def token_secrets(**env) -> list[dict]:
        result = subprocess.run([sys.executable, "-m", "tui.cli", "deploy", model.name, "--target", "prod-gpu/ml",
                                 "--dry-run"], capture_output=True, text=True, env=dict(os.environ, **env), timeout=60)
        assert result.returncode == 0, result.stderr
        found = [o for o in yaml.safe_load_all(result.stdout) if o["metadata"]["name"].endswith("-hf-token")]
        assert bool(found) == ("your Hugging Face token" in result.stderr)
        return found

    assert token_secrets() == []
    (Path(os.environ["HF_HOME"]) / "token").write_text("hf_fromTheLoginFile\n")
    [secret] = token_secrets()
    assert secret["stringData"] == {"token": "hf_fromTheLoginFile"}
    [secret] = token_secrets(HF_TOKEN="hf_fromTheEnvironment")
    assert secret["stringData"] == {"token": "hf_fromTheEnvironment"}


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


async def test_a_cluster_deployment_follows_its_pods_and_leaves_nothing_behind(db, on_emulator, monkeypatch):
    import kubernetes

    from engine import deployments

    monkeypatch.setenv("MODELDECK_VLLM_IMAGE", "registry.local/vllm-openai:v0.11.0")
    deployment, _ = await asyncio.to_thread(deployments.deploy, db, "qwen",
                                            DeploySettings(target="emu/ml", tensor_parallel=2))
    assert deployment.backend == "kubernetes" and deployment.gpus == "2"
    assert deployment.endpoint.startswith("http://127.0.0.1:")  # where the port-forward will listen
    # The image is stored with the deployment as resolved at its start: its supervisor reads it there.
    assert deployment.loads(deployment.settings_json, {})["options"]["image"] == "registry.local/vllm-openai:v0.11.0"
    await deployment_where(db, deployment.id, lambda d: d.phase == "creating the pod")
    assert {("deployments", "md-qwen"), ("services", "md-qwen")} <= live(on_emulator)
    served = await asyncio.to_thread(kubernetes.client.AppsV1Api(client_for(on_emulator)).read_namespaced_deployment,
                                     "md-qwen", "ml")
    assert served.spec.template.spec.containers[0].image == "registry.local/vllm-openai:v0.11.0"
    # The scheduler's part: no node has the GPUs.
    core = kubernetes.client.CoreV1Api(client_for(on_emulator))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "md-qwen-7f9", "namespace": "ml", "labels": Owner.deployment("qwen", deployment.api_key).labels("server")},
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


async def test_a_vllm_image_with_spaces_is_refused_wherever_it_comes_from(db, on_emulator, monkeypatch):
    from engine import deployments

    with pytest.raises(EngineError, match="without spaces$"):
        await until_done(asyncio.to_thread(deployments.plan, db, "qwen", DeploySettings(target="emu/ml", options={"image": "a b"})))
    monkeypatch.setenv("MODELDECK_VLLM_IMAGE", "registry.local/vllm openai")
    with pytest.raises(EngineError, match=r"without spaces \(\$MODELDECK_VLLM_IMAGE\)$"):
        await until_done(asyncio.to_thread(deployments.plan, db, "qwen", DeploySettings(target="emu/ml")))


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


# Fine-tuning on a cluster: a Job running modeldeck's own fine-tune entry point.

IMAGE = "registry.local/modeldeck-finetune:0.1"


def finetune_spec(name="qwen-chat-lora", data=b'{"text": "hi"}\n', gpus=1, **extra):
    import gzip

    from engine.targets.kubernetes.manifests import ClusterFinetune

    return ClusterFinetune(name, "u1", "ml", IMAGE, "qwen", "Qwen/Qwen2.5-0.5B-Instruct", "7ae5576",
                           gzip.compress(data, mtime=0), "chat.jsonl", {"rank": 8, "max_steps": 3}, gpus, **extra)


def mount(objects: list[dict], folder):
    """What the kubelet makes of the Job's projected volume: each key of its ConfigMap and Secrets a file
    in one folder."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            for key, text in obj.get("data", {}).items():
                (folder / key).write_text(text)
        if obj["kind"] == "Secret" and obj["metadata"]["labels"]["modeldeck.dev/role"] == "dataset":
            for key, packed in obj.get("data", {}).items():
                (folder / key).write_bytes(base64.b64decode(packed))
    return folder


@pytest.mark.parametrize("variant", [
    finetune_spec(), finetune_spec("CPU run", gpus=0),
    finetune_spec("big-data " + "x" * 80, data=os.urandom(2_500_000), gpus=4, hf_token="hf_secret", attempt=2),
], ids=["one-gpu", "cpu", "three-parts-token-long-name"])
def test_every_finetune_manifest_passes_the_strict_schemas_and_the_dataset_survives_the_trip(variant, tmp_path):
    import gzip
    import json

    from engine.jobs.training import join_parts
    from engine.targets.kubernetes.manifests import finetune_objects

    objects = finetune_objects(variant)
    for obj in objects:
        validate_strictly(obj)
        assert variant.owner.owns(obj["metadata"]["labels"]) and len(obj["metadata"]["name"]) <= 63
    job = objects[-1]
    assert job["kind"] == "Job" and variant.owner.owns(job["spec"]["template"]["metadata"]["labels"])
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == IMAGE and container["command"][-2:] == ["--spec", "/modeldeck/spec/finetune.json"]
    assert container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == (str(variant.gpus) if variant.gpus else None)
    assert "hf_secret" not in json.dumps(job)  # the token reaches the pod through its Secret only
    # The ConfigMaps, projected into one folder as the kubelet does, give back the very dataset.
    sources = {(s.get("configMap") or s["secret"])["name"]
               for s in next(v for v in pod["volumes"] if v["name"] == "spec")["projected"]["sources"]}
    assert sources == {o["metadata"]["name"] for o in objects if o["metadata"]["labels"]["modeldeck.dev/role"]
                       in ("spec", "dataset")}
    assert all(o["kind"] == "Secret" for o in objects if o["metadata"]["labels"]["modeldeck.dev/role"] == "dataset")
    folder = mount(objects, tmp_path / "spec")
    join_parts(folder, tmp_path / "whole")
    assert (tmp_path / "whole").read_bytes() == gzip.decompress(variant.dataset_gz)
    run = json.loads((folder / "finetune.json").read_text())
    assert run["output"] == variant.adapter_folder and run["gpus"] == (",".join(map(str, range(variant.gpus))) or "cpu")


def run_entry_point(tmp_path, tiny_model_dir, name="tiny-chat-lora"):
    """The Job's command, run here as a real process on the tiny model (a pod would download its base)."""
    import json
    import subprocess
    import sys

    from engine.targets.kubernetes.manifests import finetune_objects
    from tests.tinydata import write_dataset

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_dataset(tmp_path, "openai").read_bytes()
    spec = finetune_spec(name, data=data, gpus=0)
    spec.hyperparameters = {"batch_size": 4, "grad_accum": 1, "learning_rate": 1e-2, "max_steps": 4}
    folder = mount(finetune_objects(spec), tmp_path / "spec")
    run = json.loads((folder / "finetune.json").read_text())
    (folder / "finetune.json").unlink()
    run |= {"dataset_parts": str(folder), "output": str(tmp_path / "adapter" / name), "base_path": str(tiny_model_dir)}
    (tmp_path / "finetune.json").write_text(json.dumps(run))
    from engine.jobs import child_env

    result = subprocess.run([sys.executable, "-m", "engine.jobs.finetune", "--spec", str(tmp_path / "finetune.json")],
                            capture_output=True, text=True, timeout=240, env=child_env())
    return result, tmp_path / "adapter" / name


def test_the_jobs_entry_point_trains_without_a_database_and_tells_its_progress_in_its_log(tmp_path, tiny_model_dir):
    from engine.jobs.reported import parse

    result, adapter = run_entry_point(tmp_path, tiny_model_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    events = [e for e in map(parse, result.stdout.splitlines()) if e is not None]
    assert {"phase": "loading the base model"} in events and {"phase": "saving the adapter"} in events
    reports = [e for e in events if "metrics" in e]
    assert reports[-1]["metrics"]["step"] == 4 and reports[-1]["fields"]["progress"] == 1.0
    told = [p[0] for e in reports for p in e["points"].get("train", [])]
    assert told == sorted(set(told)) and told[-1] == 4  # each loss point told once
    done = events[-1]["done"]
    assert done["steps"] == 4 and done["base"] == "qwen" and done["size_bytes"] > 0
    assert (adapter / "adapter_model.safetensors").exists() and not adapter.with_name(adapter.name + ".partial").exists()
    # A pod that runs again after finishing (its node went away after the run, say) does not train again.
    again, _ = run_entry_point(tmp_path, tiny_model_dir)
    assert again.returncode == 0 and parse(again.stdout.splitlines()[-1]) == {"done": done}


async def model_where(db, model_id, predicate, timeout=60):
    from catalog.schema import Model
    from engine import jobs

    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        await asyncio.to_thread(jobs.reconcile, db)
        with db.read() as session:
            row = session.get(Model, model_id)
        if predicate(row):
            return row
        await asyncio.sleep(0.2)  # the emulator lives on this loop: let it answer the supervisor
    raise AssertionError(f"timed out; the model is {row.state.value} ({row.reason})")


def owner_of(db, adapter: str):
    from catalog.schema import Model
    from engine.models import find_model

    with db.read() as session:
        model: Model = find_model(session, adapter)
    return Owner.finetune(adapter, model.meta["cluster"]["uid"])


def timestamped(text: str):
    """A pod's log as the API gives it with timestamps=true (RFC 3339, trailing zeros of the fraction
    dropped), as text/plain."""
    import kmock

    lines = [f"2026-11-26T10:{i // 600:02d}:{i // 10 % 60:02d}.{i % 10 or ''}".rstrip(".") + f"Z {line}"
             for i, line in enumerate(text.splitlines(), start=1)]
    return kmock.Response(payload=("\n".join(lines) + "\n").encode(), headers={"Content-Type": "text/plain"})


def job_pod(db, adapter: str, state: dict, name: str = "md-ft-run-x1") -> dict:
    """A pod of the fine-tune's Job, as the Job controller makes it (with the pod template's labels)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ml", "labels": owner_of(db, adapter).labels("finetune")},
            "spec": {"containers": [{"name": "finetune", "image": IMAGE}]},
            "status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "finetune", "image": IMAGE, "imageID": "", "ready": True,
                                              "restartCount": 0, "state": state}]}}


async def start_on_emulator(db, tmp_path, name):
    from engine import finetune
    from engine.hyperparameters import Hyperparameters
    from tests.tinydata import write_dataset

    checked = await asyncio.to_thread(finetune.plan, db, "qwen", write_dataset(tmp_path, "openai"),
                                      Hyperparameters(max_steps=4), "1", target="emu/ml", options={"image": IMAGE})
    assert "4 steps on 1 GPU on the cluster emu/ml" in checked.summary()
    return await asyncio.to_thread(finetune.start, db, checked, name)


async def test_a_cluster_finetune_follows_its_job_and_registers_the_adapter_it_wrote(db, on_emulator, tmp_path,
                                                                                    tiny_model_dir):
    import json

    import kubernetes

    from catalog.schema import ModelKind, ModelState
    from engine import jobs

    result, _ = await asyncio.to_thread(run_entry_point, tmp_path / "pod", tiny_model_dir, "run")
    assert result.returncode == 0, result.stderr[-2000:]
    model, job = await start_on_emulator(db, tmp_path, "run")
    assert (model.kind, model.state, model.path) == (ModelKind.ADAPTER, ModelState.PENDING, None)
    on = model.meta["cluster"]
    uid = on.pop("uid")
    assert on == {"target": "emu/ml", "image": IMAGE, "gpus": 1, "volume": "md-ft-run-adapter",
                                     "folder": "/modeldeck/adapter/run"} and len(uid) == 12
    await model_where(db, model.id, lambda m: ("jobs", "md-ft-run") in live(on_emulator))
    assert {("configmaps", "md-ft-run-spec"), ("secrets", "md-ft-run-data-000"),
            ("persistentvolumeclaims", "md-ft-run-adapter")} <= live(on_emulator)
    # The Job controller's and the kubelet's part: a pod runs modeldeck's entry point; its log is the real one.
    client = client_for(on_emulator)
    core, batch = kubernetes.client.CoreV1Api(client), kubernetes.client.BatchV1Api(client)
    # The log so far: up to the end of training (before the held-out rows are scored and the adapter is
    # saved), then the whole of it.
    lines = result.stdout.splitlines()
    so_far = {"log": "\n".join(lines[:next(i for i, line in enumerate(lines) if "evaluating the adapter" in line)])}
    on_emulator["get /api/v1/namespaces/ml/pods/md-ft-run-x1/log"] << (lambda: timestamped(so_far["log"]))
    await asyncio.to_thread(core.create_namespaced_pod, "ml", job_pod(db, "run", {"running": {}}))
    await model_where(db, model.id, lambda m: json.loads(jobs.get(db, job.id).metrics_json or "{}").get("step") == 4)
    from engine.format import job_progress

    assert "100% loss " in job_progress(jobs.get(db, job.id))  # the row shows training, not a phase
    so_far["log"] = result.stdout
    await asyncio.to_thread(batch.patch_namespaced_job, "md-ft-run", "ml", {"status": {
        "conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}})
    done = await model_where(db, model.id, lambda m: m.state != ModelState.PENDING)
    finished = jobs.get(db, job.id)
    assert done.state == ModelState.READY, (done.reason, jobs.log_tail(finished.log_path, 20))
    metrics = json.loads(finished.metrics_json)
    steps = [p[0] for p in metrics["curve"]["train"]]
    assert steps[-1] == 4 and steps == sorted(set(steps)) and metrics["tokens_per_s"] > 0
    assert done.meta["steps"] == 4 and done.meta["final_loss"] > 0 and done.size_bytes > 0
    log = Path(finished.log_path).read_text()
    assert "step 4/4" in log and "@modeldeck" not in log  # the pod's own lines, without the events
    # The Job and its inputs are gone; the adapter's volume stays, and deleting the adapter removes it.
    # (kmock has no garbage collector: the pod stays; the Job was deleted with Background propagation, so
    # a real cluster removes its pods with it.)
    assert live(on_emulator) - {("pods", "md-ft-run-x1")} == {("persistentvolumeclaims", "md-ft-run-adapter")}
    deleted_job = next(r for r in on_emulator._requests if r.method.value == "DELETE" and r.name == "md-ft-run")
    assert (deleted_job.data or {}).get("propagationPolicy") == "Background" or \
        deleted_job.params.get("propagationPolicy") == "Background"
    await until_done(asyncio.to_thread(models.delete_model, db, "run"))
    assert live(on_emulator) - {("pods", "md-ft-run-x1")} == set()


async def until_done(call):
    task = asyncio.ensure_future(call)
    while not task.done():
        await asyncio.sleep(0.1)  # the emulator answers on this loop
    return await task


async def test_a_failed_cluster_finetune_says_why_and_keeps_what_a_retry_needs(db, on_emulator, tmp_path):
    import kubernetes

    from catalog.schema import ModelState
    from engine.jobs.reported import PREFIX

    model, _job = await start_on_emulator(db, tmp_path, "oops")
    await model_where(db, model.id, lambda m: ("jobs", "md-ft-oops") in live(on_emulator))
    client = client_for(on_emulator)
    core, batch = kubernetes.client.CoreV1Api(client), kubernetes.client.BatchV1Api(client)
    # Not schedulable first: the model says so while it waits.
    pending = job_pod(db, "oops", {"waiting": {"reason": "ContainerCreating"}})
    pending["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "message":
                                                             "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}
    await asyncio.to_thread(core.create_namespaced_pod, "ml", pending)
    from engine import jobs

    await model_where(db, model.id, lambda m: "Insufficient nvidia.com/gpu" in (jobs.get(db, m.job_id).metrics_json or ""))
    on_emulator["get /api/v1/namespaces/ml/pods/md-ft-run-x1/log"] << timestamped(
        "10:00:01 loading\n" + PREFIX + '{"failed":"out of GPU memory: lower the batch size or the max length (or use QLoRA)"}')
    await asyncio.to_thread(core.patch_namespaced_pod, "md-ft-run-x1", "ml", {"status": job_pod(db, "oops", {
        "terminated": {"exitCode": 1, "reason": "Error"}})["status"]})
    await asyncio.to_thread(batch.patch_namespaced_job, "md-ft-oops", "ml", {"status": {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit"}], "failed": 1}})
    failed = await model_where(db, model.id, lambda m: m.state != ModelState.PENDING)
    assert failed.state == ModelState.FAILED
    assert failed.reason == "out of GPU memory: lower the batch size or the max length (or use QLoRA)"
    await model_where(db, model.id, lambda m: ("jobs", "md-ft-oops") not in live(on_emulator))
    assert {kind for kind, _ in live(on_emulator)} == {"persistentvolumeclaims", "pods"}  # the pod is the Job's to remove
    assert {n for k, n in live(on_emulator) if k == "persistentvolumeclaims"} == {"md-ft-oops-adapter", "md-ft-oops-cache"}


async def test_stopping_a_cluster_finetune_deletes_its_job_and_a_retry_reuses_its_volumes(db, on_emulator, tmp_path):
    from catalog.schema import ModelState
    from engine import finetune, jobs

    model, job = await start_on_emulator(db, tmp_path, "halt")
    await model_where(db, model.id, lambda m: ("jobs", "md-ft-halt") in live(on_emulator))
    await until_done(asyncio.to_thread(jobs.cancel, db, job.id))
    stopped = await model_where(db, model.id, lambda m: m.state != ModelState.PENDING)
    assert stopped.reason == "finetune cancelled" and jobs.get(db, job.id).state.value == "cancelled"
    assert live(on_emulator) == {("persistentvolumeclaims", "md-ft-halt-adapter"),
                                 ("persistentvolumeclaims", "md-ft-halt-cache")}
    said = Path(jobs.get(db, job.id).log_path).read_text()  # the job's log says what went and what stays
    assert "deleted from the cluster: Job/md-ft-halt" in said and "; kept: adapter, model-cache" in said
    # A retry makes the Job again, and finds its volumes where they were (created once, not refused).
    _row, again = await asyncio.to_thread(finetune.rerun, db, stopped)
    await model_where(db, model.id, lambda m: ("jobs", "md-ft-halt") in live(on_emulator))
    assert jobs.get(db, again.id).state.value == "running"
    await until_done(asyncio.to_thread(jobs.cancel, db, again.id))


async def test_cluster_finetune_plans_refuse_what_cannot_run_there(db, on_emulator, tmp_path, tiny_model_dir):
    from engine import finetune
    from engine.hyperparameters import Hyperparameters
    from tests.tinydata import write_dataset

    data = write_dataset(tmp_path, "openai")
    models.import_path(db, tiny_model_dir, "local-tiny")
    for base, target, image, gpus, message in [
        ("qwen", "nope/ml", IMAGE, "1", "no context 'nope' in the kubeconfig; it has: emu"),
        ("qwen", "emu/ml", "", "1", r"runs in an image you name \(Image; --image\)"),
        ("qwen", "emu/ml", IMAGE, "0,1", "on a cluster, give how many GPUs the pod gets"),
        ("local-tiny", "emu/ml", IMAGE, "1", "local-tiny is not a model from the Hub"),
    ]:
        with pytest.raises(EngineError, match=message):
            finetune.plan(db, base, data, Hyperparameters(), gpus, target=target, options={"image": image})
    with pytest.raises(EngineError, match="QLoRA needs a CUDA GPU"):
        finetune.plan(db, "qwen", data, Hyperparameters(method="qlora"), "cpu", target="emu/ml", options={"image": IMAGE})
    # bitsandbytes is the image's to have, not this machine's: the pod's run checks it.
    two = finetune.plan(db, "qwen", data, Hyperparameters(method="qlora"), "2", target="emu/ml", options={"image": IMAGE})
    assert two.gpus == "0,1" and two.placement.gpu_count == 2


def test_finetune_dry_run_prints_valid_manifests_and_touches_nothing(db, hub, tmp_path):
    import subprocess
    import sys

    import yaml

    from engine import models
    from tests.conftest import settled
    from tests.tinydata import write_dataset

    model, _ = models.pull(db, "org/tiny")
    settled(db, model.id)
    data = write_dataset(tmp_path, "alpaca")
    cli = [sys.executable, "-m", "tui.cli", "finetune", model.name, str(data)]
    env = dict(os.environ, MODELDECK_FINETUNE_IMAGE=IMAGE)
    result = subprocess.run(cli + ["--target", "prod-gpu/ml", "--gpus", "2", "--rank", "32", "--dry-run"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects] == ["ConfigMap", "Secret", "PersistentVolumeClaim", "PersistentVolumeClaim",
                                            "Job"]
    for obj in objects:
        validate_strictly(obj)
        assert obj["metadata"]["namespace"] == "ml"
    container = objects[-1]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE and container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    import json

    run = json.loads(objects[0]["data"]["finetune.json"])
    assert run["base_repo"] == "org/tiny" and run["hyperparameters"]["rank"] == 32 and run["gpus"] == "0,1"
    assert "30 rows, Alpaca format" in result.stderr and "2 GPUs on the cluster prod-gpu/ml" in result.stderr
    assert [r.model.name for r in models.model_rows(db)] == [model.name]  # nothing registered, nothing started
    for extra, message in ((["--dry-run"], "give --target CONTEXT/NAMESPACE"),
                           (["--target", "prod-gpu/ml", "--image", "", "--dry-run"], "runs in an image you name")):
        refused = subprocess.run(cli + extra, capture_output=True, text=True, env=dict(os.environ), timeout=60)
        assert refused.returncode == 1 and message in refused.stderr


async def dialog_on_custom(pilot, key: str, dialog_type):
    """The dialog `key` opens on Custom's first model, once it shows the kubeconfig's contexts."""
    from tests.tui_helpers import wait_for

    app = pilot.app
    await wait_for(pilot, lambda: app.store.loaded, what="first load")
    await pilot.press("2", key)
    dialog = await wait_for(pilot, lambda: isinstance(app.screen, dialog_type) and app.screen)
    await wait_for(pilot, lambda: dialog.query_one("TargetSelect").display, what="the kubeconfig's contexts")
    return dialog


async def test_the_finetune_dialog_starts_a_run_on_a_cluster(db, on_emulator, tmp_path):
    """The dashboard's way: the fine-tune dialog's Target, Namespace, Image and GPUs start a Job on the
    cluster; Custom shows the adapter Pending, its files to be on the cluster's volume."""
    from textual.widgets import Input

    from engine import jobs
    from tests.tinydata import write_dataset
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.screens.custom import CustomScreen
    from tui.screens.finetune_dialog import FinetuneDialog

    data = write_dataset(tmp_path, "alpaca")
    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        dialog = await dialog_on_custom(pilot, "f", FinetuneDialog)
        assert not dialog.query_one("#image-row").display  # this machine: its GPUs, no image
        dialog.query_one("#target").value = "emu"
        await pilot.pause()
        assert dialog.query_one("#image-row").display and not dialog.query_one("#gpus-row").display
        for field, value in {"namespace": "ml", "image": IMAGE, "gpu_count": "2", "dataset": str(data),
                             "name": "alpaca-on-emu", "max_steps": "10"}.items():
            dialog.query_one(f"#{field}", Input).value = value
        await pilot.press("ctrl+s")
        while not isinstance(app.screen, CustomScreen):
            await pilot.pause(0.1)  # the emulator answers on this loop
            assert "error" not in str(dialog.query_one("#error").render()).lower()
        adapter = next(r.model for r in app.store.models.values() if r.model.name == "alpaca-on-emu")
        assert adapter.meta["cluster"]["target"] == "emu/ml" and adapter.meta["cluster"]["gpus"] == 2
        await wait_for(pilot, lambda: "/modeldeck/adapter/alpaca-on-emu on volume md-ft-alpaca-on-emu-adapter, "
                                      "cluster emu/ml" in str(app.screen.query_one("#preview").render()),
                       what="where its files will be")
        while ("jobs", "md-ft-alpaca-on-emu") not in live(on_emulator):
            await pilot.pause(0.1)
        await until_done(asyncio.to_thread(jobs.cancel, db, adapter.job_id))


async def test_the_deploy_drawer_deploys_on_a_cluster_in_the_image_typed(db, on_emulator):
    """The dashboard's way: the drawer's Target shows the Image row (and hides what the cluster's vLLM
    decides); the image typed there is the one the cluster runs."""
    import kubernetes
    from textual.widgets import Input

    from engine import deployments, jobs
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.screens.deploy_drawer import DeployDrawer
    from tui.screens.deployments import DeploymentsScreen

    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        drawer = await dialog_on_custom(pilot, "p", DeployDrawer)
        assert not drawer.query_one("#image-row").display and drawer.query_one("#gpus-row").display
        drawer.query_one("#target").value = "emu"
        await pilot.pause()
        assert drawer.query_one("#image-row").display and not drawer.query_one("#gpus-row").display
        assert app.focused is drawer.query_one("#target")  # not the Backend it started on, hidden now
        assert drawer.query_one("#image", Input).placeholder == "vllm/vllm-openai:latest"
        drawer.query_one("#image", Input).value = "vllm/vllm-openai:v0.11.0"
        await wait_for(pilot, lambda: "Kubernetes" in str(drawer.query_one("#plan").render()), what="the plan")
        await pilot.press("ctrl+s")
        while app.screen is drawer:
            assert str(drawer.query_one("#error").render()) in ("", "Checking and starting…")
            await pilot.pause(0.1)  # the emulator answers on this loop
        assert isinstance(app.screen, DeploymentsScreen)  # where the new deployment is followed
        [deployment] = await asyncio.to_thread(deployments.deployment_rows, db)
        while ("deployments", "md-qwen") not in live(on_emulator):
            await pilot.pause(0.1)
        apps = kubernetes.client.AppsV1Api(client_for(on_emulator))
        served = await asyncio.to_thread(apps.read_namespaced_deployment, "md-qwen", "ml")
        assert served.spec.template.spec.containers[0].image == "vllm/vllm-openai:v0.11.0"
        await until_done(asyncio.to_thread(jobs.cancel, db, deployment.job_id))


async def test_an_adapter_fine_tuned_on_the_cluster_is_served_there_from_its_volume(db, on_emulator):
    import kubernetes

    from catalog.schema import Model, ModelKind, ModelState
    from engine import deployments
    from engine.targets.kubernetes.manifests import adapter_folder, adapter_volume

    with db.write() as session:
        base = session.exec(__import__("sqlmodel").select(Model).where(Model.name == "qwen")).one()
        cluster_meta = {"target": "emu/ml", "image": IMAGE, "gpus": 1, "volume": adapter_volume("support-lora"),
                        "folder": adapter_folder("support-lora"), "uid": "a1b2c3"}
        session.add(Model(name="support-lora", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune:qwen",
                          base_id=base.id, meta_json=Model.dumps({"cluster": cluster_meta,
                                                                  "hyperparameters": {"rank": 24}})))
        session.add(Model(name="local-lora", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune:qwen",
                          base_id=base.id, path="/tmp/local-lora"))
        sql_meta = cluster_meta | {"volume": adapter_volume("sql-lora"), "folder": adapter_folder("sql-lora")}
        session.add(Model(name="sql-lora", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune:qwen",
                          base_id=base.id, meta_json=Model.dumps({"cluster": sql_meta,
                                                                  "hyperparameters": {"rank": 8}})))
    with pytest.raises(EngineError, match="local-lora's files are on this machine"):
        await asyncio.to_thread(deployments.plan, db, "local-lora", DeploySettings(target="emu/ml"))
    with pytest.raises(EngineError, match="support-lora was fine-tuned on emu/ml, where its files are: deploy it there"):
        await asyncio.to_thread(deployments.plan, db, "support-lora", DeploySettings(target="emu/other"))
    with pytest.raises(EngineError, match="support-lora's files are on the cluster emu/ml, where it was fine-tuned"):
        await asyncio.to_thread(deployments.plan, db, "support-lora", DeploySettings(), [])  # on this machine
    from engine import finetune

    with pytest.raises(EngineError, match="support-lora's files are on the cluster emu/ml; merging works on files here"):
        finetune.merge(db, "support-lora")
    with pytest.raises(EngineError, match="local-lora's files are on this machine"):  # beside a cluster's adapter
        await asyncio.to_thread(deployments.plan, db, "support-lora", DeploySettings(target="emu/ml"), None, None,
                                ["local-lora"])
    deployment, _ = await asyncio.to_thread(deployments.deploy, db, "support-lora",
                                            DeploySettings(target="emu/ml", served_name="support"),
                                            adapters=["sql-lora"])
    await deployment_where(db, deployment.id, lambda d: ("deployments", "md-support") in live(on_emulator))
    apps = kubernetes.client.AppsV1Api(client_for(on_emulator))
    served = client_for(on_emulator).sanitize_for_serialization(
        await asyncio.to_thread(apps.read_namespaced_deployment, "md-support", "ml"))
    validate_strictly(served)
    pod = served["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "Qwen/Qwen2.5-0.5B-Instruct"  # the base, from the Hub
    modules = args.index("--lora-modules")  # each adapter from its own volume, mounted read-only
    assert args[modules + 1:modules + 3] == ["support=/modeldeck/adapter/support-lora",
                                             "sql-lora=/modeldeck/adapter-1/sql-lora"]
    assert args[args.index("--max-lora-rank") + 1] == "32" and args[args.index("--served-model-name") + 1] == "support-base"
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if v["name"].startswith("adapter")}
    assert claims == {"adapter": {"claimName": "md-ft-support-lora-adapter", "readOnly": True},
                      "adapter-1": {"claimName": "md-ft-sql-lora-adapter", "readOnly": True}}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["adapter"] == "/modeldeck/adapter" and mounts["adapter-1"] == "/modeldeck/adapter-1"
    # a pod cannot mount another volume while it runs: adapters join it when it is deployed
    from engine import targets

    with pytest.raises(EngineError, match="reads adapters from volumes mounted when it starts"):
        targets.resolve("emu/ml").adapter_path(deployment, session_model(db, "sql-lora"))
    await until_done(asyncio.to_thread(deployments.stop, db, deployment.id))
    assert live(on_emulator) == set()


def session_model(db, name: str):
    from engine.models import find_model

    with db.read() as session:
        return find_model(session, name)


def test_the_finetune_image_recipe_installs_the_jobs_entry_point(tmp_path):
    """deploy/finetune.Dockerfile, as far as it can be checked without a container engine: what it copies
    builds the modeldeck package, and that package holds the module the Job's command runs."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from engine.targets.kubernetes.manifests import finetune_objects

    root = Path(__file__).resolve().parents[1]
    context = tmp_path / "context"
    context.mkdir()
    for line in (root / "deploy" / "finetune.Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, _destination = line.split()[1:]
            for source in sources:  # as `docker build .` copies them from the checkout
                (shutil.copytree if (root / source).is_dir() else shutil.copy)(root / source, context / source)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            str(context), "-w", str(tmp_path / "wheels")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    names = zipfile.ZipFile(next((tmp_path / "wheels").glob("modeldeck-*.whl"))).namelist()
    command = finetune_objects(finetune_spec())[-1]["spec"]["template"]["spec"]["containers"][0]["command"]
    module = command[command.index("-m") + 1]
    assert module.replace(".", "/") + ".py" in names
    assert {"engine/jobs/reported.py", "engine/jobs/harness.py", "catalog/community.toml"} <= set(names)


async def test_a_passing_outage_of_the_api_neither_fails_nor_tears_down_a_cluster_deployment(db, on_emulator):
    import kmock

    from engine import deployments, jobs

    deployment, job = await asyncio.to_thread(deployments.deploy, db, "qwen", DeploySettings(target="emu/ml"))
    await deployment_where(db, deployment.id, lambda d: d.phase == "creating the pod")
    outage = {"on": True}
    on_emulator[lambda request: outage["on"]]["get /api/v1/namespaces/ml/pods"] << kmock.Response(
        status=503, payload={"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                             "message": "the server is currently unable to handle the request"})
    await deployment_where(db, deployment.id, lambda d: "unable to handle the request; trying again" in
                           Path(jobs.get(db, job.id).log_path).read_text(), timeout=20)
    await asyncio.sleep(4)  # two more polls of the outage
    row = (await asyncio.to_thread(deployments.deployment_rows, db, {deployment.id}))[0]
    assert row.state.value == "pending" and ("deployments", "md-qwen") in live(on_emulator)
    outage["on"] = False
    core = __import__("kubernetes").client.CoreV1Api(client_for(on_emulator))
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "md-qwen-1", "namespace": "ml", "labels": Owner.deployment("qwen", deployment.api_key).labels("server")},
           "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
           "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                          "message": "0/1 nodes are available"}]}}
    await asyncio.to_thread(core.create_namespaced_pod, "ml", pod)
    await deployment_where(db, deployment.id, lambda d: d.phase == "not schedulable: 0/1 nodes are available")
    await until_done(asyncio.to_thread(deployments.stop, db, deployment.id))


def test_log_lines_are_read_once_even_when_a_runtime_stamps_several_alike():
    from engine.targets.kubernetes.finetune import fresh_lines

    first = ["2026-11-26T10:00:01.5Z loading", "2026-11-26T10:00:02.25Z step 1",
             # CRI-O gives every line of one buffer the same stamp: the last two lines of a run, say
             "2026-11-26T10:00:03.1Z adapter written", "2026-11-26T10:00:03.1Z @modeldeck {\"done\": {}}"]
    fresh, mark = fresh_lines(first[:3], None)
    assert fresh == ["loading", "step 1", "adapter written"]
    # The next read goes back before the last one: what was read is skipped, the line stamped alike is not.
    fresh, mark = fresh_lines(first[1:], mark)
    assert fresh == ['@modeldeck {"done": {}}']
    # RFC 3339 drops trailing zeros: .1 is after .05, though "1Z" sorts before "05Z" as text.
    fresh, _ = fresh_lines(["2026-11-26T10:00:03.05Z earlier", "2026-11-26T10:00:03.2Z later"], mark)
    assert fresh == ["later"]


async def test_a_namesake_on_the_cluster_is_refused_and_left_alone(db, on_emulator, tmp_path):
    """Another modeldeck (or another adapter whose name cleans to the same) has objects of that name in the
    namespace: this run is refused with the reason, and the other's objects are neither reused nor deleted."""
    import kubernetes

    from catalog.schema import ModelState

    theirs = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
              "metadata": {"name": "md-ft-twin-adapter", "namespace": "ml",
                           "labels": Owner.finetune("twin", "someone-else").labels("adapter")},
              "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}}
    core = kubernetes.client.CoreV1Api(client_for(on_emulator))
    await asyncio.to_thread(core.create_namespaced_persistent_volume_claim, "ml", theirs)
    model, _job = await start_on_emulator(db, tmp_path, "twin")
    failed = await model_where(db, model.id, lambda m: m.state != ModelState.PENDING)
    assert failed.reason.startswith("creating PersistentVolumeClaim md-ft-twin-adapter: it already exists in "
                                    "namespace 'ml'") and "choose another name" in failed.reason
    assert live(on_emulator) == {("persistentvolumeclaims", "md-ft-twin-adapter")}  # theirs, still there
    await until_done(asyncio.to_thread(models.delete_model, db, "twin"))
    assert live(on_emulator) == {("persistentvolumeclaims", "md-ft-twin-adapter")}


async def test_a_job_that_cannot_make_its_pod_says_why(db, on_emulator, tmp_path):
    import json

    import kubernetes

    from engine import jobs

    model, job = await start_on_emulator(db, tmp_path, "quota")
    await model_where(db, model.id, lambda m: ("jobs", "md-ft-quota") in live(on_emulator))
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "md-ft-quota.1", "namespace": "ml"},
             "involvedObject": {"kind": "Job", "name": "md-ft-quota", "namespace": "ml"}, "type": "Warning",
             "reason": "FailedCreate", "lastTimestamp": "2026-11-26T10:00:00Z",
             "message": 'pods "md-ft-quota-x" is forbidden: exceeded quota: gpu-quota, requested: '
                        'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=8, limited: requests.nvidia.com/gpu=8'}
    await asyncio.to_thread(kubernetes.client.CoreV1Api(client_for(on_emulator)).create_namespaced_event, "ml", event)
    def phase(m) -> str:
        return json.loads(jobs.get(db, job.id).metrics_json or "{}").get("phase", "")

    await model_where(db, model.id, lambda m: phase(m).startswith(
        'the Job cannot create its pod: pods "md-ft-quota-x" is forbidden: exceeded quota: gpu-quota'))
    await until_done(asyncio.to_thread(jobs.cancel, db, job.id))


async def test_a_ready_pod_without_kubectl_here_keeps_the_deployment_and_says_why(db, on_emulator, monkeypatch):
    """The server is Ready on the cluster; reaching it from here fails (no kubectl on PATH, as on this
    machine): the deployment waits, saying so in its phase, and nothing on the cluster is torn down. The
    dashboard's Active deployments follows the phase as it changes."""
    import kubernetes

    from engine import deployments
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp

    monkeypatch.setenv("PATH", "/nonexistent")  # wherever kubectl might be, it is not reachable now
    checked = await asyncio.to_thread(deployments.plan, db, "qwen", DeploySettings(target="emu/ml"))
    assert any("kubectl is not on PATH" in note for note in checked.warnings)
    deployment, _ = await asyncio.to_thread(deployments.start, db, checked)
    await deployment_where(db, deployment.id, lambda d: ("deployments", "md-qwen") in live(on_emulator))
    core = kubernetes.client.CoreV1Api(client_for(on_emulator))
    app = ModelDeckApp(db)
    async with app.run_test(size=(160, 30)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded, what="first load")
        await pilot.press("3")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "md-qwen-1", "namespace": "ml",
                            "labels": Owner.deployment("qwen", deployment.api_key).labels("server")},
               "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
        await asyncio.to_thread(core.create_namespaced_pod, "ml", pod)
        from tui.widgets.live_table import LiveTable

        def state_cell() -> str:
            cells = app.screen.query_one("#table", LiveTable).cells(deployment.id)
            return " ".join(getattr(c, "plain", str(c)) for c in cells)

        await wait_for(pilot, lambda: "port-forward failed" in state_cell(), 30,
                       what="the phase on screen")
    row = await deployment_where(db, deployment.id, lambda d: "port-forward failed" in (d.phase or ""))
    assert row.state.value == "pending" and "install kubectl on PATH" in row.phase
    assert ("deployments", "md-qwen") in live(on_emulator)
    await until_done(asyncio.to_thread(deployments.stop, db, deployment.id))
    assert live(on_emulator) - {("pods", "md-qwen-1")} == set()


async def test_a_hub_model_is_deployed_on_a_cluster_without_a_download_here(db, on_emulator, hub):
    """The cluster downloads it: nothing comes to this machine, and Custom lists it as living on the cluster."""
    from engine import deployments
    from engine import hub as hubmod
    from engine.format import delete_consequence, model_location

    deployment, _ = await until_done(asyncio.to_thread(deployments.deploy, db, "org/tiny", DeploySettings(target="emu/ml")))
    model = next(r.model for r in models.model_rows(db) if r.model.repo_id == "org/tiny")
    assert (model.name, model.state, model.path, model.meta) == ("tiny", ModelState.READY, None,
                                                                 {"cluster": {"target": "emu/ml"}})
    assert model_location(model) == "downloaded from the Hub by the cluster emu/ml when it runs it"
    await deployment_where(db, deployment.id, lambda d: ("deployments", "md-tiny") in live(on_emulator))
    apps = __import__("kubernetes").client.AppsV1Api(client_for(on_emulator))
    served = await asyncio.to_thread(apps.read_namespaced_deployment, "md-tiny", "ml")
    args = served.spec.template.spec.containers[0].args
    assert args[args.index("--model") + 1] == "org/tiny" and not hubmod.repo_cache_dir("org/tiny").exists()
    await until_done(asyncio.to_thread(deployments.stop, db, deployment.id))
    with pytest.raises(EngineError, match="tiny lives on the cluster emu/ml, which downloads it itself: deploy it "
                                          r"there, or download it here first \(modeldeck pull org/tiny\)"):
        await asyncio.to_thread(deployments.plan, db, "tiny", DeploySettings())
    plan = await asyncio.to_thread(models.delete_plan, db, "tiny")
    assert delete_consequence(plan).startswith("Nothing of it is on this machine")
    # Downloaded here after all, it lives here too: the same row, Pending, then Ready with its files.
    await asyncio.to_thread(models.pull, db, "org/tiny")
    from tests.conftest import settled

    here = await asyncio.to_thread(settled, db, model.id)
    assert here.state == ModelState.READY and here.path and "cluster" not in here.meta


async def test_community_runs_a_model_on_a_cluster_without_downloading_it_here(db, on_emulator):
    """Deploy on a Community model that is not here: besides Download, the question offers a target that
    downloads it itself; the drawer opens on the cluster, and the deployment starts there."""
    from engine import deployments, jobs
    from tests.tui_helpers import wait_for
    from tui.app import ModelDeckApp
    from tui.screens.confirm import ChoiceDialog
    from tui.screens.deploy_drawer import DeployDrawer

    app = ModelDeckApp(db)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: app.store.loaded and app.store.targets, what="the targets")
        entry = "HuggingFaceTB/SmolLM2-135M-Instruct"
        app.screen.table.move_to_key(entry)
        await pilot.press("p")
        question = await wait_for(pilot, lambda: isinstance(app.screen, ChoiceDialog) and app.screen)
        assert "Or run it on a target that downloads it itself (Kubernetes)" in question.message
        await pilot.press("t")
        drawer = await wait_for(pilot, lambda: isinstance(app.screen, DeployDrawer) and app.screen)
        await wait_for(pilot, lambda: drawer.query_one("TargetSelect").value == "emu/ml", what="the cluster chosen")
        await wait_for(pilot, lambda: "Kubernetes" in str(drawer.query_one("#plan").render()), what="the plan")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.screen is not drawer, 30, what="the deployment to start")
        [deployment] = await asyncio.to_thread(deployments.deployment_rows, db)
        model = next(r.model for r in models.model_rows(db) if r.model.repo_id == entry)
        assert model.meta == {"cluster": {"target": "emu/ml"}} and model.path is None
        await wait_for(pilot, lambda: ("deployments", k8s_name(deployment.name)) in live(on_emulator), 30,
                       what="its Deployment on the cluster")
        await until_done(asyncio.to_thread(jobs.cancel, db, deployment.job_id))
