"""Talking to a cluster with the official `kubernetes` client (the optional [kubernetes] extra, imported
only here): the user's kubeconfig contexts, applying a deployment's objects, reading their state as
modeldeck's lifecycle, and deleting everything a deployment labelled.

API errors become messages a user can act on: no permission in that namespace, quota exceeded, a name
already taken, a context that cannot be reached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.targets.kubernetes.manifests import LABEL_ROLE, Owner

REQUEST_TIMEOUT_S = 15  # a cleanup must end within its supervisor's stop deadline, answered or not

# kind -> (API class, the name in its create_/list_/delete_namespaced_* methods); applied in this order
KINDS = {
    "Secret": ("CoreV1Api", "secret"),
    "ConfigMap": ("CoreV1Api", "config_map"),
    "PersistentVolumeClaim": ("CoreV1Api", "persistent_volume_claim"),
    "Deployment": ("AppsV1Api", "deployment"),
    "Job": ("BatchV1Api", "job"),
    "Service": ("CoreV1Api", "service"),
}


def kubeconfig_path() -> Path | None:
    """The kubeconfig in use (KUBECONFIG's first file, else ~/.kube/config), when there is one."""
    first = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    path = Path(first).expanduser() if first else Path.home() / ".kube" / "config"
    return path if path.is_file() else None


def _kubernetes():
    try:
        import kubernetes
    except ImportError:
        raise EngineError("Kubernetes targets need the kubernetes client: pip install 'modeldeck[kubernetes]'") from None
    return kubernetes


def _kubeconfig_contexts() -> tuple[list[dict], dict | None]:
    """The kubeconfig's contexts as it lists them, and the current one; none without a kubeconfig."""
    if kubeconfig_path() is None:
        return [], None
    kubernetes = _kubernetes()
    try:
        return kubernetes.config.list_kube_config_contexts(config_file=str(kubeconfig_path()))
    except Exception as exc:  # noqa: BLE001 - a broken kubeconfig is a message, not a crash
        raise EngineError(f"cannot read the kubeconfig {kubeconfig_path()}: {exc}") from None


def namespaces() -> dict[str, str]:
    """The kubeconfig's contexts, each with its namespace ('default' where it names none)."""
    return {c["name"]: (c.get("context") or {}).get("namespace") or "default" for c in _kubeconfig_contexts()[0]}


def contexts() -> tuple[list[str], str | None]:
    """The kubeconfig's context names and the current one."""
    found, current = _kubeconfig_contexts()
    return [c["name"] for c in found], (current or {}).get("name")


NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS-1123 label


def parse_target(target: str) -> tuple[str, str]:
    """'CONTEXT/NAMESPACE' (without a namespace: 'default'; check_target takes the context's own)."""
    context, _, namespace = target.partition("/")
    if not context:
        raise EngineError(f"target {target!r}: expected CONTEXT/NAMESPACE, like prod-gpu/ml")
    if namespace and not NAMESPACE.match(namespace):
        raise EngineError(f"namespace {namespace!r}: Kubernetes takes lowercase letters, digits and '-' (at most 63)")
    return context, namespace or "default"


def check_target(target: str) -> tuple[str, str]:
    """A CONTEXT[/NAMESPACE] target whose context is in the kubeconfig, as (context, namespace); without
    a namespace, the context's own."""
    context, namespace = parse_target(target)
    known = namespaces()
    if context not in known:
        raise EngineError(f"no context {context!r} in the kubeconfig" + (f"; it has: {', '.join(known)}" if known
                                                                        else " (none found)"))
    return context, namespace if "/" in target else known[context]


def api_client(context: str | None = None, host: str | None = None):
    """A client for a kubeconfig context, or for a plain API URL (`host`: the tests' emulator)."""
    kubernetes = _kubernetes()
    if host is not None:
        configuration = kubernetes.client.Configuration()
        configuration.host = host
        return kubernetes.client.ApiClient(configuration)
    if kubeconfig_path() is None:
        raise EngineError("no kubeconfig found (KUBECONFIG or ~/.kube/config)")
    try:
        return kubernetes.config.new_client_from_config(config_file=str(kubeconfig_path()), context=context)
    except Exception as exc:  # noqa: BLE001 - an unknown context, a broken file
        raise EngineError(f"cannot use the kubeconfig context {context!r}: {exc}") from None


def explain(exc: Exception, doing: str, namespace: str) -> EngineError:
    """An API or connection failure as one line that says what to do."""
    kubernetes = _kubernetes()
    if isinstance(exc, kubernetes.client.exceptions.ApiException):
        message = exc.reason or ""
        try:
            import json

            message = json.loads(exc.body or "{}").get("message") or message
        except (ValueError, AttributeError):
            pass
        if exc.status == 409:
            return EngineError(f"{doing}: it already exists in namespace {namespace!r} ({message}); another "
                               "deployment or fine-tune of that name has it: choose another name")
        if exc.status == 403 and "quota" in message.lower():
            return EngineError(f"{doing}: the namespace {namespace!r} is over its quota: {message}")
        if exc.status == 403:
            return EngineError(f"{doing}: no permission in namespace {namespace!r} (403): {message}")
        if exc.status == 401:
            return EngineError(f"{doing}: the cluster refused the kubeconfig's credentials (401)")
        if exc.status == 404:
            return EngineError(f"{doing}: not found (404): {message}; does the namespace {namespace!r} exist?")
        return EngineError(f"{doing}: the cluster answered {exc.status}: {message}")
    return EngineError(f"{doing}: cannot reach the cluster ({type(exc).__name__}: {exc})")


def _api(client, kind: str):
    kubernetes = _kubernetes()
    class_name, method = KINDS[kind]
    return getattr(kubernetes.client, class_name)(client), method


def apply(client, objects: list[dict], reuse_roles: tuple[str, ...] = ()) -> None:
    """Create each object; on a failure, remove what this call created (nothing half-made stays). An
    object whose role is in `reuse_roles` and that exists already, carrying the same owner's labels, is
    kept as it is: a retried fine-tune finds its checkpoints and its model cache where it left them."""
    kubernetes = _kubernetes()
    created: list[dict] = []
    for obj in objects:
        api, method = _api(client, obj["kind"])
        namespace, labels = obj["metadata"]["namespace"], obj["metadata"]["labels"]
        try:
            try:
                getattr(api, f"create_namespaced_{method}")(namespace, obj)
            except kubernetes.client.exceptions.ApiException as exc:
                if exc.status != 409 or labels.get(LABEL_ROLE) not in reuse_roles:
                    raise
                there = getattr(api, f"read_namespaced_{method}")(obj["metadata"]["name"], namespace)
                if there.metadata.labels != labels:
                    raise
                if there.metadata.deletion_timestamp:  # going: a pod could not mount it
                    raise EngineError(f"{obj['kind']} {obj['metadata']['name']} is still being deleted from "
                                      f"namespace {namespace!r}; try again once it is gone") from None
                continue
        except Exception as exc:  # every failure is explained, then undone
            for done in reversed(created):
                _delete_one(client, done["kind"], done["metadata"]["namespace"], done["metadata"]["name"])
            if isinstance(exc, EngineError):
                raise
            raise explain(exc, f"creating {obj['kind']} {obj['metadata']['name']}", namespace) from None
        created.append(obj)


def _delete_one(client, kind: str, namespace: str, name: str) -> None:
    kubernetes = _kubernetes()
    api, method = _api(client, kind)
    try:
        # In the background, with what the object owns: a Job's pods, a Deployment's ReplicaSets (the API
        # would leave a Job's pods running otherwise).
        getattr(api, f"delete_namespaced_{method}")(name, namespace, propagation_policy="Background",
                                                    _request_timeout=REQUEST_TIMEOUT_S)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 404:  # gone already is what we wanted
            raise


def delete_all(client, namespace: str, owner: Owner, keep_roles: tuple[str, ...] = ()) -> list[str]:
    """Delete every object that carries the owner's labels, but those whose role is in `keep_roles`;
    returns 'Kind/name' of each deleted."""
    removed = []
    for kind in reversed(list(KINDS)):
        api, method = _api(client, kind)
        try:
            found = getattr(api, f"list_namespaced_{method}")(namespace, label_selector=owner.selector(),
                                                              _request_timeout=REQUEST_TIMEOUT_S)
            for item in found.items:
                if not owner.owns(item.metadata.labels):  # checked here too: never another's object
                    continue
                if (item.metadata.labels or {}).get(LABEL_ROLE) in keep_roles:
                    continue
                _delete_one(client, kind, namespace, item.metadata.name)
                removed.append(f"{kind}/{item.metadata.name}")
        except Exception as exc:  # noqa: BLE001
            raise explain(exc, f"deleting the {kind}s of {owner.kind} {owner.name}", namespace) from None
    return removed


def clean_up(client, namespace: str, owner: Owner, log: Callable[[str], None],
             keep_roles: tuple[str, ...] = ()) -> None:
    """A supervisor's last step: delete what its owner has on the cluster (but the roles kept), saying so
    in its log. A failure is logged, not raised: deleting the owner's record from modeldeck tries again."""
    try:
        removed = delete_all(client, namespace, owner, keep_roles=keep_roles)
        log("deleted from the cluster: " + (", ".join(removed) or "nothing left")
            + (f"; kept: {', '.join(keep_roles)}" if keep_roles else ""))
    except EngineError as exc:
        log(f"could not delete everything from the cluster: {exc}")


def delete_owned(target: str, owner: Owner, what: str) -> None:
    """After its record is gone from modeldeck: delete what it owned on the cluster, or say how to."""
    context, namespace = parse_target(target)
    try:
        delete_all(api_client(context), namespace, owner)
    except EngineError as exc:
        kinds = ",".join(sorted({KINDS[kind][1].replace("_", "") for kind in KINDS}))
        raise EngineError(f"removed {what} from modeldeck, but not its objects on the cluster ({exc}); delete them "
                          f"with: kubectl --context {context} -n {namespace} delete {kinds} -l {owner.selector()}"
                          ) from None


def pods(client, namespace: str, owner: Owner) -> list[dict[str, Any]]:
    """The owner's pods as plain dicts (what the status mapping reads)."""
    kubernetes = _kubernetes()
    core = kubernetes.client.CoreV1Api(client)
    try:
        found = core.list_namespaced_pod(namespace, label_selector=owner.selector())
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, f"reading the pods of {owner.kind} {owner.name}", namespace) from None
    return [client.sanitize_for_serialization(pod) for pod in found.items if owner.owns(pod.metadata.labels)]


def job(client, namespace: str, name: str) -> dict[str, Any] | None:
    """A Job as a plain dict; None when it is gone."""
    kubernetes = _kubernetes()
    try:
        found = kubernetes.client.BatchV1Api(client).read_namespaced_job(name, namespace)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise explain(exc, f"reading the Job {name}", namespace) from None
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, f"reading the Job {name}", namespace) from None
    return client.sanitize_for_serialization(found)


def warning(client, namespace: str, name: str) -> str | None:
    """The newest Warning event about an object (a Job that cannot create its pod says why there)."""
    kubernetes = _kubernetes()
    try:
        found = kubernetes.client.CoreV1Api(client).list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}", _request_timeout=REQUEST_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a hint only: no permission to read events is no reason to fail
        return None
    warnings = [e for e in found.items if e.type == "Warning" and e.involved_object and e.involved_object.name == name]
    newest = max(warnings, key=lambda e: str(e.last_timestamp or e.event_time or ""), default=None)
    return newest.message if newest is not None else None


def log_lines(client, namespace: str, pod: str, since_seconds: int | None = None) -> list[str]:
    """A pod's log lines, each starting with the kubelet's RFC 3339 timestamp (the last `since_seconds`
    only, when given); none while it has no log yet."""
    kubernetes = _kubernetes()
    core = kubernetes.client.CoreV1Api(client)
    extra = {"since_seconds": since_seconds} if since_seconds else {}
    try:
        text = core.read_namespaced_pod_log(pod, namespace, timestamps=True, **extra)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status in (400, 404):  # the container has not started, or the pod is gone
            return []
        raise explain(exc, f"reading the log of {pod}", namespace) from None
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, f"reading the log of {pod}", namespace) from None
    return text.splitlines()


def last_log_lines(client, namespace: str, pod: str, lines: int = 5) -> list[str]:
    """The previous (crashed) container's last lines, else the current one's."""
    kubernetes = _kubernetes()
    core = kubernetes.client.CoreV1Api(client)
    for previous in (True, False):
        try:
            text = core.read_namespaced_pod_log(pod, namespace, tail_lines=lines, previous=previous)
        except Exception:  # noqa: BLE001, S112 - no previous container, or no log yet
            continue
        if text:
            return [line for line in text.splitlines() if line.strip()][-lines:]
    return []
