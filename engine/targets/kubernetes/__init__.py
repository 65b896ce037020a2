"""The Kubernetes target: a context of the user's kubeconfig and a namespace ("CONTEXT[/NAMESPACE]").

A deployment is vLLM in a Deployment and a Service, reached from here through a port-forward
(serve.py); a fine-tune is modeldeck's own entry point in a Job, followed through its pod's log
(finetune.py). What they are made of is in manifests.py, how modeldeck talks to the cluster in cluster.py
(with the optional `kubernetes` client, imported only when a cluster is used), and how pods read as
modeldeck's lifecycle in status.py. The cluster downloads what it runs from the Hub itself.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import secrets
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catalog.settings import current as current_settings
from catalog.states import JobKind, ModelKind, ModelState
from engine.errors import EngineError
from engine.targets import Choice, OptionField, Placement, Serving, Target

if TYPE_CHECKING:
    from pathlib import Path

    from catalog.schema import Deployment, Job, Model
    from engine.backends import DeploySettings

VLLM_IMAGE_ENV = "MODELDECK_VLLM_IMAGE"
FINETUNE_IMAGE_ENV = "MODELDECK_FINETUNE_IMAGE"
VLLM_IMAGE = "vllm/vllm-openai:latest"  # the official one; set an image with a version to pin it


def vllm_image(chosen: str = "") -> str:
    """The image a deployment on a cluster runs: the one chosen, else $MODELDECK_VLLM_IMAGE, else the
    official one."""
    return (chosen or "").strip() or current_settings().vllm_image or VLLM_IMAGE


@dataclass
class ClusterTarget:
    """Where a fine-tune runs when it runs on Kubernetes."""

    target: str  # CONTEXT/NAMESPACE
    image: str  # has modeldeck installed with its [training] extra (README: Kubernetes, Fine-tuning)
    gpus: int  # 0: the pod's CPUs


class KubernetesTarget(Target):
    KIND = "kubernetes"
    TITLE = "Kubernetes"
    WHERE = "a Kubernetes context from your kubeconfig"
    SYNTAX = "CONTEXT/NAMESPACE"
    CATCHES_ALL = True
    GPUS = "count"
    # The backend (vLLM), its GPUs (the tensor-parallel size) and its address are the cluster's.
    DEPLOY_FIELDS = frozenset({"tensor_parallel", "dtype", "max_model_len", "gpu_memory_fraction", "port",
                               "served_name", "max_lora_rank"})
    STOP_DEADLINE_S = 60.0  # its supervisor deletes its objects through the API before it exits
    DOWNLOADS = True
    SPEC_FIELD = OptionField("namespace", "Namespace", "The namespace on the cluster (empty: the context's own)",
                             "a namespace", "default")
    OPTIONS = (
        OptionField("image", "Image", f"The vLLM image to run; pin a version, like vllm/vllm-openai:v0.11.0 "
                    f"(${VLLM_IMAGE_ENV} sets the default)", "a vLLM image", uses=("deploy",)),
        OptionField("image", "Image", "The image the cluster runs the fine-tune in: modeldeck with its [training] "
                    f"extra (README: Kubernetes); ${FINETUNE_IMAGE_ENV} sets it", "an image for the fine-tune",
                    "an image with modeldeck[training] installed", uses=("finetune",)),
    )

    def __init__(self, spec: str):
        from engine.targets.kubernetes.cluster import parse_target

        super().__init__(spec)
        self.context, self.namespace = parse_target(spec)

    @classmethod
    def names(cls, spec: str) -> bool:
        return bool(spec)

    @classmethod
    def discover(cls) -> list[Choice]:
        from engine.targets.kubernetes.cluster import kubeconfig_path, namespaces

        if kubeconfig_path() is None:
            return []
        return [Choice(context, f"{context} (Kubernetes)", cls.KIND, namespace)
                for context, namespace in namespaces().items()]

    @classmethod
    def holding(cls, model: Model) -> Target | None:
        on = model.meta.get("cluster")
        return cls(on["target"]) if on else None

    @classmethod
    def spec_of(cls, choice: Choice, field_value: str) -> str:
        return f"{choice.spec}/{field_value or choice.field_default or 'default'}"

    @classmethod
    def choice_of(cls, spec: str) -> tuple[str, str]:
        context, _, namespace = spec.partition("/")
        return context, namespace

    @classmethod
    def option_placeholder(cls, option: OptionField) -> str:
        if "deploy" in option.uses:
            return vllm_image()
        return current_settings().finetune_image or option.placeholder

    @property
    def label(self) -> str:
        return f"the cluster {self.spec}"

    def checked(self) -> Target:
        from engine.targets.kubernetes.cluster import check_target

        context, namespace = check_target(self.spec)
        return KubernetesTarget(f"{context}/{namespace}")

    def options(self, values: dict[str, str], what: str) -> dict[str, Any]:
        chosen = super().options(values, what)
        if what == "deploy":
            image = vllm_image(chosen.get("image", ""))
            if any(c.isspace() for c in image):
                from_env = not (chosen.get("image") or "").strip()
                raise EngineError("Image: a name like vllm/vllm-openai:v0.11.0, without spaces"
                                  + (f" (${VLLM_IMAGE_ENV})" if from_env else ""))
            return {"image": image}
        image = (chosen.get("image") or "").strip() or current_settings().finetune_image
        if not image:
            raise EngineError("a fine-tune on a cluster runs in an image you name (Image; --image): one with modeldeck "
                              "and its [training] extra installed (README: Kubernetes; deploy/finetune.Dockerfile "
                              "builds one)")
        if any(c.isspace() for c in image):
            raise EngineError("Image: a name like registry.example.com/modeldeck-finetune:0.1, without spaces")
        return {"image": image}

    # -- fine-tune -------------------------------------------------------------------------------------

    def plan_finetune(self, session, base: Model, gpus: str, options: dict[str, Any],
                      offline: bool = False) -> Placement:
        from engine import hub
        from engine.targets.kubernetes.manifests import gpu_list

        if base.kind != ModelKind.BASE or not base.repo_id:
            raise EngineError(f"{base.name} is not a model from the Hub: a fine-tune on a cluster downloads its base "
                              "model there, so only a base model from the Hub can be fine-tuned on one")
        choice = gpus.strip().lower()
        count = 1 if choice == "auto" else 0 if choice == "cpu" else int(choice) if choice.isdigit() else -1
        if not 0 <= count <= 16:
            raise EngineError(f"GPUs {gpus!r}: on a cluster, give how many GPUs the pod gets, from 0 (or cpu: its "
                              "CPUs) to 16")
        where = (f"{count} GPU{'s' if count > 1 else ''}" if count else "CPU") + \
            f" on the cluster {self.spec}, in {options['image']}" + \
            ("; your Hugging Face token goes with it, as a Secret" if hub.token() else "")
        # bitsandbytes is the image's to have, not this machine's: the pod's run checks it.
        return Placement(self, gpu_list(count), count, where, files_here=False, bitsandbytes=True,
                         details=ClusterTarget(self.spec, options["image"], count))

    def check_dataset(self, placement: Placement, dataset) -> None:
        """A cluster's pod gets the dataset through Secrets (gzip, in parts): it has a limit."""
        from engine.format import human_bytes
        from engine.targets.kubernetes.manifests import DATASET_MAX_PARTS, DATASET_PART_BYTES

        limit = DATASET_MAX_PARTS * DATASET_PART_BYTES
        size = dataset.path.stat().st_size
        if size > limit and len(gzip.compress(dataset.path.read_bytes(), compresslevel=6)) > limit:
            raise EngineError(f"{dataset.path.name} is {human_bytes(size)}, over {human_bytes(limit)} even compressed: "
                              "a fine-tune on a cluster sends its dataset in Secrets; use a smaller dataset there")

    def finetune_meta(self, placement: Placement, name: str) -> dict[str, Any]:
        from engine.targets.kubernetes.manifests import adapter_folder, adapter_volume

        return {"cluster": dataclasses.asdict(placement.details) | {
            "uid": secrets.token_hex(6), "volume": adapter_volume(name), "folder": adapter_folder(name)}}

    def run_finetune(self, ctx) -> None:
        from engine.targets.kubernetes.finetune import FinetuneOnCluster

        FinetuneOnCluster(ctx).run()

    def dry_run_finetune(self, name: str, placement: Placement, base: Model, dataset_path, hyperparameters: dict,
                         options: dict) -> tuple[str, str]:
        from engine.targets.kubernetes.manifests import finetune_objects, to_yaml

        on = self.finetune_meta(placement, name)["cluster"]  # as a start would make it
        spec = cluster_job(name, on, base, dataset_path, hyperparameters)
        note = (f"# {name}: Job {spec.job_name} in {self.spec}; the adapter lands on the volume "
                f"{spec.adapter_volume} at {spec.adapter_folder}"
                + ("; the YAML holds your Hugging Face token: keep it out of git, or seal it" if spec.hf_token else ""))
        return to_yaml(finetune_objects(spec)), note

    # -- deploy ----------------------------------------------------------------------------------------

    def plan_deploy(self, session, model: Model, base: Model | None, settings: DeploySettings,
                    kept_ports: set[int], available_gpus, adapters: list[tuple[str, Model]] = ()) -> Serving:
        """vLLM on the cluster, which downloads the model from the Hub itself; reached from here through a
        port-forward on a free local port. The fit is the cluster scheduler's to judge."""
        from engine.backends import checked_listen

        served = settings.served_name or model.name
        cluster_deploy("plan", self.spec, model, base, served, settings, "", adapters)  # refuses what it cannot serve
        local = checked_listen(dataclasses.replace(settings, host="127.0.0.1", backend="vllm"), kept_ports)
        gpus = settings.tensor_parallel
        warnings = [f"runs on the cluster {self.context!r}, namespace {self.namespace!r}, with {gpus} "
                    f"GPU{'s' if gpus != 1 else ''}; reached here through a port-forward"]
        if shutil.which("kubectl") is None:
            warnings.append("kubectl is not on PATH: the server will run on the cluster, but Connect and chat from "
                            "here need kubectl port-forward")
        return Serving(local, "kubernetes", str(gpus), None, f"http://127.0.0.1:{local.port}/v1", warnings,
                       summary="vLLM on Kubernetes",
                       placed_by="by the cluster's scheduler, on nodes with the GPUs it asks for")

    def serve(self, ctx, deployment: Deployment, model: Model, base: Model | None,
              adapters: list[tuple[str, Model]]) -> None:
        from engine.targets.kubernetes.serve import serve

        serve(ctx, deployment, model, base, adapters)

    def adapter_path(self, deployment: Deployment | None, adapter: Model) -> str:
        raise EngineError(f"a server on {self.label} reads adapters from volumes mounted when it starts: deploy it "
                          f"again with {adapter.name!r} (--adapter), which mounts its volume")

    def dry_run_deploy(self, name: str, model: Model, base: Model | None, settings: DeploySettings,
                       adapters: list[tuple[str, Model]] = ()) -> tuple[str, str]:
        from engine.targets.kubernetes.manifests import deployment_objects, in_cluster_url, to_yaml

        served = settings.served_name or model.name
        spec = cluster_deploy(name, self.spec, model, base, served, settings, "sk-md-" + secrets.token_urlsafe(24),
                              adapters)
        note = (f"# {spec.name} in {self.spec}: {in_cluster_url(spec)} once applied; the YAML holds its API key"
                + (" and your Hugging Face token" if spec.hf_token else "") + ": keep it out of git, or seal it")
        return to_yaml(deployment_objects(spec)), note

    def serving_command(self, deployment: Deployment, model: Model | None, base: Model | None,
                        adapters: list[tuple[str, Model]] = ()) -> str:
        from engine.backends import DeploySettings
        from engine.targets.kubernetes.manifests import port_forward_command

        image = DeploySettings.of(deployment).options.get("image") or VLLM_IMAGE
        forward = port_forward_command(deployment.name, self.spec, deployment.endpoint.rsplit(":", 1)[1].split("/")[0])
        return (f"vLLM ({image}) on the cluster {self.spec} (deploy --target {self.spec} --image {image} --dry-run "
                f"prints its manifests); reached through: {forward}")

    def connect_fields(self, deployment: Deployment) -> list[tuple[str, str, str]]:
        from engine.targets.kubernetes.manifests import port_forward_command, service_url

        return [("In the cluster", service_url(deployment.name, self.namespace), ""),
                ("Port-forward", port_forward_command(deployment.name, self.spec),
                 "  (modeldeck keeps one open to the URL above)")]

    # -- what outlives a supervisor, and deleting ------------------------------------------------------

    def orphaned(self, job: Job) -> str:
        if job.kind == JobKind.FINETUNE:  # its Job runs on without its supervisor
            return "; its Job and volumes stay on the cluster until you delete this adapter"
        # A cluster's objects cannot be killed from here: deleting the deployment removes them.
        return "; its objects are still on the cluster until you delete this deployment"

    def location(self, model: Model) -> str | None:
        on = model.meta["cluster"]
        if "volume" not in on:
            return f"downloaded from the Hub by the cluster {on['target']} when it runs it"
        return f"{on['folder']} on volume {on['volume']}, cluster {on['target']}"

    def lives_there(self) -> dict[str, Any]:
        return {"cluster": {"target": self.spec}}

    def refuse_here(self, model: Model, doing: str) -> EngineError:
        if "volume" not in model.meta["cluster"]:
            return EngineError(f"{model.name} lives on the cluster {self.spec}, which downloads it itself: {doing} it "
                               f"there, or download it here first (modeldeck pull {model.repo_id})")
        if doing == "merge":
            return EngineError(f"{model.name}'s files are on the cluster {self.spec}; merging works on files here. "
                               "Deploy it on that cluster instead")
        return EngineError(f"{model.name}'s files are on the cluster {self.spec}, where it was fine-tuned: {doing} it "
                           "with that target")

    def owns_files(self, model: Model) -> bool:
        return "volume" in model.meta["cluster"]

    def delete_consequence(self, model: Model) -> str | None:
        on = model.meta["cluster"]
        if "volume" not in on:
            return f"Nothing of it is on this machine; the cluster {on['target']} downloads it itself."
        return (f"Its volume {on['volume']} on the cluster {on['target']} is deleted, with the adapter's files and "
                "anything left of its run.")

    def delete_files(self, model: Model) -> None:
        """A cluster fine-tune's adapter lives on a volume there: it goes, with anything else of its run."""
        from engine.targets.kubernetes import cluster
        from engine.targets.kubernetes.manifests import Owner

        on = model.meta["cluster"]
        if "uid" in on:
            cluster.delete_owned(on["target"], Owner.finetune(model.name, on["uid"]), f"adapter {model.name!r}")

    def delete_deployment(self, deployment: Deployment) -> None:
        """Normally gone already (its supervisor deletes them); not if the supervisor was killed."""
        from engine.targets.kubernetes import cluster
        from engine.targets.kubernetes.manifests import Owner

        cluster.delete_owned(self.spec, Owner.deployment(deployment.name, deployment.api_key),
                             f"deployment {deployment.name!r}")


def cluster_deploy(name: str, target: str, model: Model, base: Model | None, served_name: str,
                   settings: DeploySettings, api_key: str, adapters: list[tuple[str, Model]] = ()):
    """The objects' description of a deployment on a cluster (manifests.py). The cluster downloads a base
    model from the Hub itself; an adapter must be one fine-tuned on that same cluster and namespace, whose
    files are on a volume there (each adapter served: its volume mounted)."""
    from engine import hub
    from engine.backends import base_served_name
    from engine.targets.kubernetes.cluster import parse_target
    from engine.targets.kubernetes.manifests import ClusterAdapter, ClusterDeploy

    _context, namespace = parse_target(target)

    def on_cluster(adapter: Model) -> ClusterAdapter:
        on = adapter.meta.get("cluster")
        if not on:
            raise EngineError(f"{adapter.name}'s files are on this machine: a cluster serves an adapter fine-tuned "
                              "on it (a fine-tune with that cluster as its target)")
        if parse_target(on["target"]) != parse_target(target):
            raise EngineError(f"{adapter.name} was fine-tuned on {on['target']}, where its files are: deploy it there")
        if adapter.state != ModelState.READY:
            raise EngineError(f"{adapter.name!r} is {adapter.state.value}; deploy it once it is Ready")
        rank = int((adapter.meta.get("hyperparameters") or {}).get("rank", 16))
        return ClusterAdapter(on["volume"], on["folder"], rank)

    weights = model
    if model.kind == ModelKind.ADAPTER:
        if base is None or not base.repo_id:
            raise EngineError(f"the base model of {model.name!r} is missing")
        weights = base
    elif not model.repo_id or model.kind != ModelKind.BASE:
        raise EngineError(f"{model.name} is not a model from the Hub: a cluster downloads what it serves, so only a "
                          "base model from the Hub (or an adapter fine-tuned on that cluster) can be deployed there")
    served = [(name, on_cluster(adapter)) for name, adapter in adapters]
    if model.kind == ModelKind.ADAPTER and not any(adapter.id == model.id for _, adapter in adapters):
        served.insert(0, (served_name, on_cluster(model)))  # (a plan given only the deployed adapter)
    return ClusterDeploy(name, namespace, weights.repo_id, weights.revision, served_name, settings,
                         settings.tensor_parallel, api_key, hf_token=hub.token(),
                         image=vllm_image(settings.options.get("image", "")),
                         base_served_name=base_served_name(served_name, model), adapters=served)


def cluster_job(name: str, on: dict, base: Model, dataset: Path, hyperparameters: dict, attempt: int = 1):
    """The Job of a cluster fine-tune and the objects around it (manifests.py). `on` is the adapter's
    meta["cluster"]: target, image, gpus and uid."""
    from engine import hub
    from engine.finetune import estimated_disk_bytes, model_limits
    from engine.hyperparameters import Hyperparameters
    from engine.targets.kubernetes.cluster import parse_target
    from engine.targets.kubernetes.manifests import ClusterFinetune

    _context, namespace = parse_target(on["target"])
    # The adapter's volume holds two checkpoints, the dataset's copy and the adapter, with room to spare.
    limits = model_limits(base.path if base.state == ModelState.READY else None)
    needed = estimated_disk_bytes(Hyperparameters(**hyperparameters), limits) + 2 * dataset.stat().st_size
    return ClusterFinetune(name, on["uid"], namespace, on["image"], base.name, base.repo_id, base.revision,
                           gzip.compress(dataset.read_bytes(), compresslevel=6, mtime=0), dataset.name,
                           hyperparameters, on["gpus"], attempt, hub.token(),
                           adapter_size_gib=max(2, math.ceil(needed * 1.5 / 2**30)))
