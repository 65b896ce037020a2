"""The objects a deployment on Kubernetes is made of, as plain dicts (what `--dry-run` prints as YAML):

- a Secret holding the deployment's API key (and one holding the Hugging Face token, when there is one);
- a PersistentVolumeClaim for the model cache, so a restarted pod does not download the model again;
- a Deployment running the vLLM OpenAI server image (the official one unless another is chosen) with
  the drawer's settings, GPU requests, and probes on /health (startup, readiness, liveness);
- a ClusterIP Service in front of it.

Every object carries the labels that tie it to its modeldeck deployment (Owner), so stopping
removes them all by label and nothing is left behind. Pure functions: no cluster, no client library.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from engine.backends import VLLM_MAX_LORAS, DeploySettings, vllm_lora_rank
from engine.targets.kubernetes import VLLM_IMAGE

PORT = 8000
MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_ROLE = "modeldeck.dev/role"
LABEL_UID = "modeldeck.dev/uid"
CACHE_PATH = "/root/.cache/huggingface"
SPEC_PATH, CACHE_MOUNT, ADAPTER_MOUNT = "/modeldeck/spec", "/modeldeck/cache", "/modeldeck/adapter"


NAME_ROOM = 50  # an object's base name; suffixes like "-api-key" or "-data-000" keep it within 63


def k8s_name(name: str, prefix: str = "md-") -> str:
    """A DNS-1123 name (lowercase letters, digits, '-') made from a modeldeck name, short enough for the
    suffixes of the objects made from it. A name cut short ends in a hash of the whole, so two long names
    that start alike stay apart."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if len(prefix + cleaned) > NAME_ROOM:
        digest = hashlib.sha1(name.encode()).hexdigest()[:6]
        cleaned = cleaned[:NAME_ROOM - len(prefix) - 7].rstrip("-") + "-" + digest
    return (prefix + cleaned).rstrip("-") or prefix.rstrip("-")


@dataclass(frozen=True)
class Owner:
    """What a set of cluster objects belongs to: a deployment, or a fine-tune (named after its adapter).
    Its labels are on every object, so deleting by label leaves nothing behind and touches nothing else.
    Names are not enough for that (two modeldecks can share a namespace, and names are cleaned for
    Kubernetes), so the labels also carry a uid that is this owner's alone."""

    kind: str  # "deployment" | "finetune"
    name: str  # the modeldeck name
    uid: str

    @classmethod
    def deployment(cls, name: str, api_key: str) -> Owner:
        """A deployment's uid comes from its API key (random, its own), hashed: nothing to store."""
        return cls("deployment", name, hashlib.sha256(api_key.encode()).hexdigest()[:12])

    @classmethod
    def finetune(cls, adapter: str, uid: str) -> Owner:
        """A fine-tune's uid is made when it starts, and kept with its adapter."""
        return cls("finetune", adapter, uid)

    @property
    def label(self) -> str:
        return f"modeldeck.dev/{self.kind}"

    @property
    def base_name(self) -> str:
        """The name of its main object; the others add a suffix."""
        return k8s_name(self.name, "md-" if self.kind == "deployment" else "md-ft-")

    def labels(self, role: str) -> dict[str, str]:
        return {MANAGED_BY: "modeldeck", self.label: k8s_name(self.name, ""), LABEL_UID: self.uid, LABEL_ROLE: role}

    def selector(self) -> str:
        """The label selector of everything it owns."""
        return f"{MANAGED_BY}=modeldeck,{self.label}={k8s_name(self.name, '')},{LABEL_UID}={self.uid}"

    def owns(self, item_labels: dict | None) -> bool:
        wanted = self.labels("")
        return all((item_labels or {}).get(key) == wanted[key] for key in (MANAGED_BY, self.label, LABEL_UID))


@dataclass
class ClusterAdapter:
    """A LoRA adapter a cluster fine-tune left on its volume, served by vLLM on its base model."""

    volume: str
    folder: str  # as its fine-tune's pod saw it (its volume mounted at ADAPTER_MOUNT)
    rank: int

    def mounted(self, index: int) -> tuple[str, str]:
        """Where a server with several adapters mounts the volume of its index-th one, and where its folder is
        then (the first at ADAPTER_MOUNT, as its fine-tune saw it)."""
        mount = ADAPTER_MOUNT if index == 0 else f"{ADAPTER_MOUNT}-{index}"
        return mount, mount + self.folder.removeprefix(ADAPTER_MOUNT)


@dataclass
class ClusterDeploy:
    """What a deployment on a cluster needs beyond the drawer's settings."""

    name: str  # the modeldeck deployment's name
    namespace: str
    repo_id: str  # the cluster downloads the model from the Hub
    revision: str | None
    served_name: str
    settings: DeploySettings
    gpus: int  # nvidia.com/gpu per pod (the tensor-parallel size)
    api_key: str
    hf_token: str | None = None
    cache_size_gib: int = 50
    image: str = VLLM_IMAGE
    base_served_name: str = ""  # the base model's name in requests (default: served_name)
    adapters: list[tuple[str, ClusterAdapter]] = field(default_factory=list)  # each served under its name

    @property
    def owner(self) -> Owner:
        return Owner.deployment(self.name, self.api_key)


def _meta(owner: Owner, namespace: str, name: str, role: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": owner.labels(role)}


def _secret(metadata: dict, string_data: dict[str, str]) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "stringData": string_data}


def _volume_claim(metadata: dict, size_gib: int) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata,
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{size_gib}Gi"}}}}


def _hf_token_env(secret: str) -> dict:
    """The pod's HF_TOKEN, from the Secret that holds the user's Hugging Face token."""
    return {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}


def _shared_memory() -> dict:
    """/dev/shm: tensor parallel and data loaders talk through shared memory; a pod's default 64 MiB is too small."""
    return {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}


def deployment_objects(spec: ClusterDeploy) -> list[dict]:
    """Every object of a deployment, in the order they are applied."""
    owner = spec.owner
    base = owner.base_name
    key_secret, token_secret, cache = f"{base}-api-key", f"{base}-hf-token", f"{base}-cache"
    objects = [_secret(_meta(owner, spec.namespace, key_secret, "api-key"), {"api-key": spec.api_key})]
    if spec.hf_token:
        objects.append(_secret(_meta(owner, spec.namespace, token_secret, "hf-token"), {"token": spec.hf_token}))
    objects.append(_volume_claim(_meta(owner, spec.namespace, cache, "model-cache"), spec.cache_size_gib))
    s = spec.settings
    args = ["--model", spec.repo_id, "--served-model-name", spec.base_served_name or spec.served_name,
            "--host", "0.0.0.0", "--port", str(PORT),
            "--tensor-parallel-size", str(s.tensor_parallel), "--dtype", s.dtype,
            "--gpu-memory-utilization", str(s.gpu_memory_fraction), "--disable-uvicorn-access-log"]
    if spec.revision:
        args += ["--revision", spec.revision]
    if s.max_model_len:
        args += ["--max-model-len", str(s.max_model_len)]
    rank = s.max_lora_rank or max((adapter.rank for _, adapter in spec.adapters), default=0)
    if rank:
        args += ["--enable-lora", "--max-lora-rank", str(vllm_lora_rank(rank)),
                 "--max-loras", str(max(len(spec.adapters), VLLM_MAX_LORAS))]
    if spec.adapters:
        args += ["--lora-modules",
                 *(f"{name}={adapter.mounted(i)[1]}" for i, (name, adapter) in enumerate(spec.adapters))]
    env = [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": key_secret, "key": "api-key"}}},
           {"name": "HF_HOME", "value": CACHE_PATH}]
    if spec.hf_token:
        env.append(_hf_token_env(token_secret))
    if rank:  # its /v1/unload_lora_adapter (an adapter joins a pod only when it starts: its volume is mounted)
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    pod_labels = owner.labels("server")
    container = {
        "name": "vllm", "image": spec.image, "args": args, "env": env,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"limits": {"nvidia.com/gpu": str(spec.gpus)}, "requests": {"nvidia.com/gpu": str(spec.gpus)}},
        # Loading a large model takes minutes: the startup probe holds the others off for up to 30 of them.
        "startupProbe": probe | {"periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": probe | {"periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": probe | {"periodSeconds": 10, "failureThreshold": 6},
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_PATH}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    volumes = [{"name": "cache", "persistentVolumeClaim": {"claimName": cache}}, _shared_memory()]
    for i, (_, adapter) in enumerate(spec.adapters):
        volume = "adapter" if i == 0 else f"adapter-{i}"
        container["volumeMounts"].append({"name": volume, "mountPath": adapter.mounted(i)[0], "readOnly": True})
        volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": adapter.volume, "readOnly": True}})
    objects.append({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(owner, spec.namespace, base, "server"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one pod holds the GPUs and the cache volume at a time
            "selector": {"matchLabels": {owner.label: pod_labels[owner.label], LABEL_ROLE: "server"}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    })
    objects.append({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, spec.namespace, base, "service"),
        "spec": {"type": "ClusterIP", "selector": {owner.label: pod_labels[owner.label], LABEL_ROLE: "server"},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    })
    return objects


DATASET_PART_BYTES = 900 * 1024  # a Secret holds at most 1 MiB
DATASET_MAX_PARTS = 30  # about 26 MiB of gzip: a JSONL dataset of a few hundred MB
KEPT_AFTER_SUCCESS = ("adapter",)  # the fine-tune's output stays on the cluster as the adapter's files
KEPT_FOR_A_RETRY = ("adapter", "model-cache")  # its checkpoints, and the base model already downloaded


def adapter_volume(adapter: str) -> str:
    """The volume claim a cluster fine-tune writes its adapter to (kept after the run)."""
    return f"{k8s_name(adapter, 'md-ft-')}-adapter"


def adapter_folder(adapter: str) -> str:
    """Where the adapter's files are on its volume, as the fine-tune's pod (and a server's) sees them."""
    return f"{ADAPTER_MOUNT}/{adapter}"


@dataclass
class ClusterFinetune:
    """A fine-tune run as a Job on a cluster: modeldeck's own fine-tune entry point, in an image that has
    modeldeck installed with its [training] extra (see the README), reading its spec and the dataset from
    a ConfigMap and Secrets, and writing the adapter to a volume that outlives the Job."""

    name: str  # the adapter's modeldeck name
    uid: str  # its Owner's
    namespace: str
    image: str
    base_model: str  # its name in modeldeck
    base_repo: str  # the Job downloads the base model from the Hub
    revision: str | None
    dataset_gz: bytes  # the dataset file, gzip-compressed
    dataset_name: str  # its file name (the format is told by its rows; the suffix says JSONL or JSON)
    hyperparameters: dict
    gpus: int  # nvidia.com/gpu for the pod; 0 trains on its CPUs
    attempt: int = 1
    hf_token: str | None = None
    cache_size_gib: int = 50
    adapter_size_gib: int = 2

    @property
    def owner(self) -> Owner:
        return Owner.finetune(self.name, self.uid)

    @property
    def job_name(self) -> str:
        return self.owner.base_name

    @property
    def adapter_volume(self) -> str:
        return adapter_volume(self.name)

    @property
    def adapter_folder(self) -> str:
        return adapter_folder(self.name)

    def parts(self) -> list[bytes]:
        return [self.dataset_gz[i:i + DATASET_PART_BYTES]
                for i in range(0, max(len(self.dataset_gz), 1), DATASET_PART_BYTES)]


def gpu_list(count: int) -> str:
    """The GPUs a pod given `count` of them sees, as the fine-tune's --gpus takes them ("cpu" for none)."""
    return ",".join(str(i) for i in range(count)) or "cpu"


def finetune_objects(spec: ClusterFinetune) -> list[dict]:
    """Every object of a fine-tune, in the order they are applied."""
    import base64
    import json

    owner, prefix = spec.owner, spec.job_name

    def meta(name: str, role: str) -> dict:
        return _meta(owner, spec.namespace, name, role)

    run = {"base_name": spec.base_model, "base_repo": spec.base_repo, "revision": spec.revision,
           "dataset_parts": SPEC_PATH, "dataset_name": spec.dataset_name, "hyperparameters": spec.hyperparameters,
           "gpus": gpu_list(spec.gpus), "output": spec.adapter_folder, "attempt": spec.attempt}
    objects: list[dict] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{prefix}-spec", "spec"),
                            "data": {"finetune.json": json.dumps(run, indent=2)}}]
    parts = spec.parts()
    for i, part in enumerate(parts):  # Secrets, not ConfigMaps: a namespace's readers should not see the data
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{prefix}-data-{i:03d}", "dataset"),
                        "type": "Opaque", "data": {f"dataset.gz.{i:03d}": base64.b64encode(part).decode()}})
    token_secret = f"{prefix}-hf-token"
    if spec.hf_token:
        objects.append(_secret(meta(token_secret, "hf-token"), {"token": spec.hf_token}))
    objects.append(_volume_claim(meta(f"{prefix}-cache", "model-cache"), spec.cache_size_gib))
    objects.append(_volume_claim(meta(spec.adapter_volume, "adapter"), spec.adapter_size_gib))
    env = [{"name": "HF_HOME", "value": CACHE_MOUNT}, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if spec.hf_token:
        env.append(_hf_token_env(token_secret))
    # Requests, so the pod is not the first evicted (nor refused where a quota asks for them); no memory
    # limit: loading a base model peaks above what training holds.
    requests = {"cpu": "4", "memory": "16Gi"} if spec.gpus else {"cpu": "2", "memory": "4Gi"}
    resources = {"requests": dict(requests)}
    if spec.gpus:
        resources["requests"]["nvidia.com/gpu"] = str(spec.gpus)
        resources["limits"] = {"nvidia.com/gpu": str(spec.gpus)}
    container = {
        "name": "finetune", "image": spec.image,
        "command": ["python", "-m", "engine.jobs.finetune", "--spec", f"{SPEC_PATH}/finetune.json"],
        "env": env, "resources": resources,
        "volumeMounts": [{"name": "spec", "mountPath": SPEC_PATH, "readOnly": True},
                         {"name": "cache", "mountPath": CACHE_MOUNT},
                         {"name": "adapter", "mountPath": ADAPTER_MOUNT},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    sources = [{"configMap": {"name": f"{prefix}-spec"}}] + [
        {"secret": {"name": f"{prefix}-data-{i:03d}"}} for i in range(len(parts))]
    objects.append({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta(prefix, "finetune"),
        "spec": {
            # An evicted or preempted pod is replaced, and resumes from its last checkpoint on the volume;
            # a run that fails on its own is not retried behind the user's back (retry is theirs to ask).
            "backoffLimit": 0,
            # (`status` is optional since Kubernetes 1.35; the schemas before it require it.)
            "podFailurePolicy": {"rules": [{"action": "Ignore",
                                            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
            "template": {
                "metadata": {"labels": owner.labels("finetune")},
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 120,  # a stop saves a checkpoint first
                    "containers": [container],
                    "volumes": [{"name": "spec", "projected": {"sources": sources}},
                                {"name": "cache", "persistentVolumeClaim": {"claimName": f"{prefix}-cache"}},
                                {"name": "adapter", "persistentVolumeClaim": {"claimName": spec.adapter_volume}},
                                _shared_memory()],
                },
            },
        },
    })
    return objects


def in_cluster_url(spec: ClusterDeploy) -> str:
    return service_url(spec.name, spec.namespace)


def service_url(deployment: str, namespace: str) -> str:
    """How other pods in the cluster reach the deployment."""
    return f"http://{k8s_name(deployment)}.{namespace}.svc.cluster.local:{PORT}/v1"


def port_forward_command(deployment: str, target: str, local_port: int | str = PORT) -> str:
    """The kubectl command that makes the deployment reachable on this machine, as modeldeck does itself."""
    context, _, namespace = target.partition("/")
    return (f"kubectl --context {context} -n {namespace or 'default'} port-forward svc/{k8s_name(deployment)} "
            f"{local_port}:{PORT}")


def to_yaml(objects: list[dict]) -> str:
    """The objects as one YAML stream, secrets' values included (what `kubectl apply -f -` takes)."""
    import yaml  # the kubernetes extra brings PyYAML

    class Plain(yaml.SafeDumper):  # no &anchors / *aliases for dicts that happen to be shared
        def ignore_aliases(self, data) -> bool:
            return True

    return "".join("---\n" + yaml.dump(obj, Dumper=Plain, sort_keys=False) for obj in objects)
