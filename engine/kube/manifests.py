"""The objects a deployment on Kubernetes is made of, as plain dicts (what `--dry-run` prints as YAML):

- a Secret holding the deployment's API key (and one holding the Hugging Face token, when there is one);
- a PersistentVolumeClaim for the model cache, so a restarted pod does not download the model again;
- a Deployment running the official vLLM OpenAI server image with the drawer's settings, GPU requests,
  and probes on /health (startup, readiness, liveness);
- a ClusterIP Service in front of it.

Every object carries the labels that tie it to its modeldeck deployment (LABEL_DEPLOYMENT), so stopping
removes them all by label and nothing is left behind. Pure functions: no cluster, no client library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.backends import DeploySettings

VLLM_IMAGE = "vllm/vllm-openai:latest"
PORT = 8000
MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "modeldeck.dev/deployment"
LABEL_ROLE = "modeldeck.dev/role"
CACHE_PATH = "/root/.cache/huggingface"


def k8s_name(name: str, prefix: str = "md-") -> str:
    """A DNS-1123 name (lowercase letters, digits, '-', at most 63) made from a modeldeck name."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (prefix + cleaned)[:63].rstrip("-") or prefix.rstrip("-")


def labels(deployment: str, role: str) -> dict[str, str]:
    return {MANAGED_BY: "modeldeck", LABEL_DEPLOYMENT: k8s_name(deployment, ""), LABEL_ROLE: role}


def selector(deployment: str) -> str:
    """The label selector of everything that belongs to a deployment."""
    return f"{MANAGED_BY}=modeldeck,{LABEL_DEPLOYMENT}={k8s_name(deployment, '')}"


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


def _meta(spec: ClusterDeploy, name: str, role: str) -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": labels(spec.name, role)}


def deployment_objects(spec: ClusterDeploy) -> list[dict]:
    """Every object of a deployment, in the order they are applied."""
    base = k8s_name(spec.name)
    key_secret, token_secret, cache = f"{base}-api-key", f"{base}-hf-token", f"{base}-cache"
    objects: list[dict] = [{
        "apiVersion": "v1", "kind": "Secret", "metadata": _meta(spec, key_secret, "api-key"),
        "type": "Opaque", "stringData": {"api-key": spec.api_key},
    }]
    if spec.hf_token:
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": _meta(spec, token_secret, "hf-token"),
                        "type": "Opaque", "stringData": {"token": spec.hf_token}})
    objects.append({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(spec, cache, "model-cache"),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{spec.cache_size_gib}Gi"}}},
    })
    s = spec.settings
    args = ["--model", spec.repo_id, "--served-model-name", spec.served_name, "--host", "0.0.0.0", "--port", str(PORT),
            "--tensor-parallel-size", str(s.tensor_parallel), "--dtype", s.dtype,
            "--gpu-memory-utilization", str(s.gpu_memory_fraction), "--disable-uvicorn-access-log"]
    if spec.revision:
        args += ["--revision", spec.revision]
    if s.max_model_len:
        args += ["--max-model-len", str(s.max_model_len)]
    env = [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": key_secret, "key": "api-key"}}},
           {"name": "HF_HOME", "value": CACHE_PATH}]
    if spec.hf_token:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret, "key": "token"}}})
    probe = {"httpGet": {"path": "/health", "port": "http"}}
    pod_labels = labels(spec.name, "server")
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
    objects.append({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, base, "server"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one pod holds the GPUs and the cache volume at a time
            "selector": {"matchLabels": {LABEL_DEPLOYMENT: pod_labels[LABEL_DEPLOYMENT], LABEL_ROLE: "server"}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": cache}},
                                # tensor parallel talks through shared memory; the default 64 MiB is too small
                                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}],
                },
            },
        },
    })
    objects.append({
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, base, "service"),
        "spec": {"type": "ClusterIP", "selector": {LABEL_DEPLOYMENT: pod_labels[LABEL_DEPLOYMENT], LABEL_ROLE: "server"},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
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

    return "".join("---\n" + yaml.safe_dump(obj, sort_keys=False) for obj in objects)
