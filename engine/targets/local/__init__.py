"""This machine as a target: its GPUs (or its CPU), a fine-tune in a job process of its own
(finetune.py), a server as the child of a supervising job (serve.py). It is also where every model with
files here lives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from catalog.states import ModelKind, ModelState
from engine.errors import EngineError
from engine.targets import Choice, Placement, Serving, Target

if TYPE_CHECKING:
    from catalog.schema import Deployment, Job, Model
    from engine.backends import DeploySettings, FitCheck, MemoryEstimate
    from engine.gpus import Gpu


class LocalTarget(Target):
    KIND = "local"
    TITLE = "this machine"
    GPUS = "here"
    DEPLOY_FIELDS = frozenset({"backend", "gpus", "tensor_parallel", "dtype", "max_model_len", "gpu_memory_fraction",
                               "port", "host", "served_name", "max_lora_rank"})

    @classmethod
    def names(cls, spec: str) -> bool:
        return spec in ("", "local")

    @classmethod
    def parse(cls, spec: str) -> Target:
        return cls("")

    @classmethod
    def discover(cls) -> list[Choice]:
        return [Choice("", "this machine", cls.KIND)]

    @property
    def label(self) -> str:
        return "this machine"

    @property
    def is_here(self) -> bool:
        return True

    # -- fine-tune -------------------------------------------------------------------------------------

    def plan_finetune(self, session, base: Model, gpus: str, options: dict[str, Any],
                      offline: bool = False) -> Placement:
        from engine import targets
        from engine.gpus import ledger_in, list_gpus, place

        home = targets.home_of(base)
        if not home.files_here(base) and not (base.state == ModelState.PENDING and base.repo_id):
            raise home.refuse_here(base, "fine-tune")
        try:
            chosen = place(gpus, ledger_in(session, list_gpus()))
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        gpus = chosen.gpus
        count = 0 if gpus == "cpu" else len(gpus.split(","))
        return Placement(self, gpus, count, "CPU" if gpus == "cpu" else f"GPU {gpus}", files_here=True,
                         chosen_because=chosen.shared or chosen.why)

    def finetune_meta(self, placement: Placement, name: str) -> dict[str, Any]:
        return {"gpus": placement.gpus}

    def run_finetune(self, ctx) -> None:
        from engine.targets.local.finetune import run

        run(ctx)

    def job_env(self, job: Job) -> dict[str, str]:
        from engine.gpus import cuda_env

        gpus = job.params.get("gpus")
        return cuda_env(gpus) if gpus else {}  # the job sees only the GPUs chosen for it

    # -- deploy ----------------------------------------------------------------------------------------

    def plan_deploy(self, session, model: Model, base: Model | None, settings: DeploySettings,
                    kept_ports: set[int], available_gpus: list[Gpu] | None,
                    adapters: list[tuple[str, Model]] = ()) -> Serving:
        from engine.backends import checked_listen, choose_backend, context_limit, vllm_available
        from engine.gpus import is_auto, ledger_in, list_gpus, place

        available_gpus = list_gpus() if available_gpus is None else available_gpus
        on_gpu = bool(available_gpus) if is_auto(settings.gpus) else settings.gpus.strip().lower() != "cpu"
        backend = choose_backend(settings.backend, on_gpu, vllm_available())
        if backend == "transformers" and settings.tensor_parallel > 1:
            raise EngineError("tensor parallel needs vLLM; the built-in server runs a model on one device")
        base = deployable(session, model)
        limit = context_limit((base or model).path) if model.path else None
        if limit and settings.max_model_len > limit:
            raise EngineError(f"max model length {settings.max_model_len:,} is over the model's own limit of "
                              f"{limit:,} tokens; leave it empty for {limit:,}")
        for _, adapter in adapters:
            deployable(session, adapter)
        needed, rough = _needed(session, model, base, settings, [a for _, a in adapters if a.id != model.id])
        share = settings.gpu_memory_fraction if backend == "vllm" else 1.0
        try:  # auto: GPUs no other deployment holds, with room for it (tensor parallel: as many as its size)
            chosen = place(settings.gpus, ledger_in(session, available_gpus),
                           settings.tensor_parallel if backend == "vllm" else 1, needed.total, share)
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        gpus = chosen.gpus
        if backend == "vllm" and (gpus == "cpu" or not vllm_available()):
            raise EngineError("vLLM needs a CUDA GPU and the vllm command; choose the built-in server (transformers)")
        if backend == "vllm" and settings.tensor_parallel > len(gpus.split(",")):
            raise EngineError(f"tensor-parallel size {settings.tensor_parallel} needs as many GPUs; "
                              f"{len(gpus.split(','))} chosen ({gpus})")
        settings = checked_listen(settings, kept_ports)
        fit = _fit(needed, rough, gpus, backend, share, available_gpus)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # where to reach it from here
        host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
        waiting = model.state == ModelState.PENDING
        warnings = [f"{model.name} is still downloading; the server starts once it is Ready"] if waiting else []
        where = "the CPU" if gpus == "cpu" else f"GPU {gpus}"
        if chosen.shared:
            warnings.append(chosen.shared)
        return Serving(settings, backend, gpus, fit, f"http://{host}:{settings.port}/v1", warnings,
                       "waiting for the download" if waiting else "starting",
                       f"{'vLLM' if backend == 'vllm' else 'built-in server'} on {where}", chosen_because=chosen.why)

    def recheck_deploy(self, session, model: Model) -> None:
        deployable(session, model)

    def serve(self, ctx, deployment: Deployment, model: Model, base: Model | None,
              adapters: list[tuple[str, Model]]) -> None:
        from engine.targets.local.serve import serve

        serve(ctx, deployment, model, base, adapters)

    def serving_command(self, deployment: Deployment, model: Model | None, base: Model | None,
                        adapters: list[tuple[str, Model]] = ()) -> str:
        from engine.backends import serve_command

        if model is None or not model.path:
            return "—"
        return serve_command(deployment, model, base, [(name, a) for name, a in adapters if a.path]).shown


def deployable(session, model: Model) -> Model | None:
    """Refuse a model that cannot be served here; returns an adapter's base. A model still downloading from
    the Hub can be deployed: its server starts once the download is done."""
    from catalog.schema import Model as ModelRow
    from engine import targets

    home = targets.home_of(model)
    if not home.files_here(model):
        raise home.refuse_here(model, "deploy")
    downloading = model.state == ModelState.PENDING and model.repo_id and model.kind == ModelKind.BASE
    if not downloading and (model.state != ModelState.READY or not model.path):
        raise EngineError(f"{model.name!r} is {model.state.value}; deploy it once it is Ready")
    if model.kind != ModelKind.ADAPTER:
        return None
    base = session.get(ModelRow, model.base_id) if model.base_id else None
    if base is None or base.state != ModelState.READY:
        raise EngineError(f"the base model of the adapter {model.name!r} is missing or not Ready")
    return base


def _needed(session, model: Model, base: Model | None, settings: DeploySettings,
            adapters: list[Model] = ()) -> tuple[MemoryEstimate, bool]:
    """The memory serving it needs (weights, its adapters' + KV cache), and whether that is rough (a model still
    downloading: 2 bytes a parameter, as most checkpoints are stored, and no KV cache yet)."""
    from catalog.schema import CommunityModel
    from engine.backends import DTYPE_BYTES, MemoryEstimate, estimate_memory

    if model.path and model.state == ModelState.READY:
        weights_from = base or model
        size = (weights_from.size_bytes or 0) + ((model.size_bytes or 0) if base else 0)
        size += sum(adapter.size_bytes or 0 for adapter in adapters)
        return estimate_memory(weights_from.path, size, settings.dtype, settings.max_model_len or None), False
    entry = session.get(CommunityModel, model.repo_id) if model.repo_id else None
    return MemoryEstimate((entry.params if entry else 0) * DTYPE_BYTES.get(settings.dtype, 2), 0), True


def _fit(needed: MemoryEstimate, rough: bool, gpus: str, backend: str, share: float,
         available_gpus: list[Gpu]) -> FitCheck:
    import psutil

    from engine.backends import FitCheck

    if gpus == "cpu":
        return FitCheck(needed, psutil.virtual_memory().available, "RAM", rough)
    chosen = [g for g in available_gpus if str(g.index) in gpus.split(",")]
    if backend == "transformers":
        chosen = chosen[:1]  # the built-in server runs on the first chosen GPU
    free = sum(min(g.memory_free_mb, g.memory_total_mb * share) * 2**20 for g in chosen)
    where = "GPU " + ",".join(str(g.index) for g in chosen) if len(chosen) == 1 else \
        "GPUs " + ",".join(str(g.index) for g in chosen)
    return FitCheck(needed, int(free), where, rough)
