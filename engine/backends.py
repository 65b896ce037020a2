"""How a model is served: the backend (vLLM where a CUDA GPU and vLLM are present, else the built-in
server), the exact command and environment that start it, a free port, and whether the model fits.

Light (no torch, no vLLM import): the deploy drawer and the CLI use it to show what will run before it
runs; the serving job runs the command it builds.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError
from engine.gpus import cuda_env
from engine.localmodel import model_config

if TYPE_CHECKING:
    from catalog.schema import Deployment, Model

BACKENDS = ("auto", "vllm", "transformers")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


VLLM_MAX_LORAS = 4  # adapters in one vLLM batch at least (its --max-loras; vLLM's own default is 1)


FIELD_LABELS = {
    "backend": "Backend", "gpus": "GPUs", "tensor_parallel": "Tensor parallel", "dtype": "Dtype",
    "max_model_len": "Max model length", "gpu_memory_fraction": "GPU memory", "port": "Port",
    "host": "Bind address", "served_name": "Served name", "max_lora_rank": "Max LoRA rank", "target": "Target",
}


@dataclass
class DeploySettings:
    backend: str = "auto"
    gpus: str = "auto"  # as engine.gpus.place takes it
    tensor_parallel: int = 1  # vLLM only
    dtype: str = "auto"
    max_model_len: int = 0  # 0: the model's own
    gpu_memory_fraction: float = 0.9  # vLLM only
    port: int = 0  # 0: a free one
    host: str = "127.0.0.1"
    served_name: str = ""  # empty: the model's name
    # The highest adapter rank it takes (vLLM reserves room for it); 0: the built-in server takes any, vLLM the
    # highest of the adapters it starts with (and none at all when it starts without)
    max_lora_rank: int = 0
    target: str = ""  # where it runs: a target's spec (engine/targets); empty: this machine
    options: dict[str, Any] = field(default_factory=dict)  # the target's own (a cluster's image, a batch job's time)

    def problems(self) -> dict[str, str]:
        errors = {}
        if self.backend not in BACKENDS:
            errors["backend"] = f"Backend {self.backend!r}: choose auto, vllm or transformers"
        if self.tensor_parallel < 1:
            errors["tensor_parallel"] = "Tensor parallel must be 1 or more"
        if self.dtype not in ("auto", *DTYPE_BYTES):
            errors["dtype"] = f"Dtype {self.dtype!r}: choose auto, bfloat16, float16 or float32"
        if self.max_model_len < 0:
            errors["max_model_len"] = "Max model length must be 0 (the model's own) or more"
        if not 0.05 <= self.gpu_memory_fraction <= 1:
            errors["gpu_memory_fraction"] = "GPU memory must be a fraction from 0.05 to 1"
        if self.served_name and not all(c.isalnum() or c in "._-/:" for c in self.served_name):
            errors["served_name"] = "Served name: letters, digits and . _ - / : only"
        if not self.host.strip() or " " in self.host:
            errors["host"] = f"Bind address {self.host!r}: an IP address or host name, like 127.0.0.1"
        if not 0 <= self.port <= 65535:
            errors["port"] = "Port must be from 1 to 65535 (or empty for a free one)"
        if not 0 <= self.max_lora_rank <= VLLM_LORA_RANKS[-1]:
            errors["max_lora_rank"] = (f"Max LoRA rank must be from 1 to {VLLM_LORA_RANKS[-1]} (or empty: from the "
                                       "adapters)")
        return errors

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> tuple[DeploySettings, dict[str, str]]:
        """Parse typed text (the drawer's fields); empty means the default. Returns the settings and, per
        field, what is wrong with it."""
        parsed, errors = {}, {}
        for f in dataclasses.fields(cls):
            text = str(values.get(f.name, "")).strip()
            if not text or f.name == "options":  # a target's options are its own to parse
                continue
            kind = type(getattr(cls, f.name))
            try:
                parsed[f.name] = kind(text)
            except ValueError:
                errors[f.name] = f"{FIELD_LABELS[f.name]}: {text!r} is not {'a whole number' if kind is int else 'a number'}"
        settings = cls(**parsed)
        return settings, errors or settings.problems()

    @classmethod
    def of(cls, deployment: Deployment) -> DeploySettings:
        """A deployment's settings as stored."""
        return cls(**deployment.loads(deployment.settings_json, {}))

    @property
    def exposed(self) -> bool:
        """Bound beyond this machine: the drawer warns."""
        return self.host not in LOOPBACK


def vllm_available() -> bool:
    """The `vllm` command is what runs, so it must be on PATH."""
    return shutil.which("vllm") is not None


def choose_backend(choice: str, on_gpu: bool, has_vllm: bool) -> str:
    """auto: vLLM where a CUDA GPU and vLLM are present, else the built-in server."""
    if choice == "auto":
        return "vllm" if on_gpu and has_vllm else "transformers"
    return choice


@dataclass
class ServeCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the job's environment; holds the key

    @property
    def shown(self) -> str:
        """The command line as the details show it (the key is in the environment, not here)."""
        program = "python" if self.argv[0] == sys.executable else self.argv[0]  # not the venv's full path
        return " ".join([program, *self.argv[1:]])


def vllm_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds an adapter of this rank."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def lora_rank(adapter_folder: str | Path | None) -> int:
    """An adapter's LoRA rank from its config (the highest of its rank pattern); 0 when it cannot be read."""
    from engine.server.adapters import rank_of  # light: it imports torch and PEFT only to load an adapter

    return rank_of(adapter_folder) if adapter_folder else 0


def base_served_name(served_name: str, deployed: Model) -> str:
    """What a deployment's base model is called in requests: its served name, or, for a deployment of an adapter
    (served under the served name), that name with "-base"."""
    from catalog.states import ModelKind

    return f"{served_name}-base" if deployed.kind == ModelKind.ADAPTER else served_name


def vllm_command(model_path: str, settings: DeploySettings, served_name: str, api_key: str, gpus: str,
                 adapters: list[tuple[str, str]] = ()) -> ServeCommand:
    """`vllm serve` with the drawer's settings: the base model as `served_name`, and each adapter (name, path) on
    it under its own name, so requests name the adapter and vLLM applies it. With adapters (or a max LoRA rank
    set), adapters can also be loaded and unloaded while it serves: its runtime routes are on."""
    argv = ["vllm", "serve", model_path, "--host", settings.host, "--port", str(settings.port),
            "--served-model-name", served_name,
            "--tensor-parallel-size", str(settings.tensor_parallel), "--dtype", settings.dtype,
            "--gpu-memory-utilization", str(settings.gpu_memory_fraction)]
    if settings.max_model_len:
        argv += ["--max-model-len", str(settings.max_model_len)]
    env = {"VLLM_API_KEY": api_key}
    rank = settings.max_lora_rank or max((lora_rank(path) or 16 for _, path in adapters), default=0)
    if rank:
        argv += ["--enable-lora", "--max-lora-rank", str(vllm_lora_rank(rank)),
                 "--max-loras", str(max(len(adapters), VLLM_MAX_LORAS))]
        if adapters:
            argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters)]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    argv.append("--disable-uvicorn-access-log")  # the supervisor's health checks would fill the log
    return ServeCommand(argv, env | cuda_env(gpus))


def builtin_command(model_path: str, settings: DeploySettings, served_name: str, api_key: str, gpus: str,
                    adapters: list[tuple[str, str]] = ()) -> ServeCommand:
    """The built-in server (engine/server/): the base model as `served_name`, and each adapter (name, path) beside
    it under its own name; it takes more adapters while it serves."""
    argv = [sys.executable, "-m", "engine.server", "--model", model_path, "--served-name", served_name,
            "--host", settings.host, "--port", str(settings.port), "--dtype", settings.dtype, "--enable-lora"]
    for name, path in adapters:
        argv += ["--adapter", f"{name}={path}"]
    if settings.max_lora_rank:
        argv += ["--max-lora-rank", str(settings.max_lora_rank)]
    if settings.max_model_len:
        argv += ["--max-model-len", str(settings.max_model_len)]
    # One device: the built-in server does not split a model; the first chosen GPU serves it.
    return ServeCommand(argv, {"MODELDECK_API_KEY": api_key} | cuda_env(gpus.split(",")[0]))


def serve_command(deployment: Deployment, model: Model, base: Model | None,
                  adapters: list[tuple[str, Model]]) -> ServeCommand:
    """A deployment's server command: its base model, and the adapters it serves (an adapter deployed is one of
    them, on its base)."""
    settings = DeploySettings.of(deployment)
    build = vllm_command if deployment.backend == "vllm" else builtin_command
    return build((base or model).path, settings, base_served_name(deployment.served_name, model), deployment.api_key,
                 deployment.gpus, [(name, adapter.path) for name, adapter in adapters])


def max_adapter_rank(backend: str, settings: DeploySettings) -> int | None:
    """The highest rank of adapter a deployment takes while it serves: 0 any, None none (vLLM started without
    adapters, nor a max LoRA rank)."""
    if backend in ("vllm", "kubernetes"):  # (a cluster's server is vLLM)
        return vllm_lora_rank(settings.max_lora_rank) if settings.max_lora_rank else None
    return settings.max_lora_rank


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen there now. Like servers do (uvicorn, vLLM), it reuses an address
    whose old connections are only waiting out TIME_WAIT."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", avoid: set[int] | frozenset = frozenset()) -> int:
    """A port nothing listens on, other than those in `avoid` (kept by servers still loading)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    return port


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def context_limit(model_path: str) -> int | None:
    """The longest sequence the model was made for (its config's max_position_embeddings), if known."""
    limit = model_config(model_path)[1].get("max_position_embeddings")
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def estimate_memory(model_path: str, size_on_disk: int, dtype: str, max_len: int | None,
                    concurrent: int = 1) -> MemoryEstimate:
    """Weights (their size on disk, rescaled to the serving dtype) and the KV cache of `concurrent`
    sequences of `max_len` tokens (2 × layers × kv heads × head size × tokens × bytes)."""
    config, text = model_config(model_path)
    stored = DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), 4)
    serving = stored if dtype == "auto" else DTYPE_BYTES[dtype]
    weights = int(size_on_disk * serving / stored)
    layers = text.get("num_hidden_layers", 0)
    heads = text.get("num_attention_heads", 1)
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // max(heads, 1))
    tokens = max_len or text.get("max_position_embeddings", 2048)
    kv = 2 * layers * kv_heads * head_dim * tokens * serving * concurrent
    return MemoryEstimate(weights, kv)


def checked_listen(settings: DeploySettings, kept_ports: set[int]) -> DeploySettings:
    """The port a server will listen on here: a free one when not given (none of `kept_ports`, which live
    deployments keep), else one nothing listens on; the address must be this machine's."""
    try:
        if settings.port == 0:
            return dataclasses.replace(settings, port=free_port(settings.host, avoid=kept_ports))
        if not port_free(settings.host, settings.port):
            raise EngineError(f"port {settings.port} on {settings.host} is in use by another program; choose "
                              "another, or leave it empty for a free one")
    except socket.gaierror:
        raise EngineError(f"bind address {settings.host!r}: not a known host name or IP address") from None
    except OSError as exc:
        raise EngineError(f"bind address {settings.host!r}: cannot listen there ({exc.strerror}); use 127.0.0.1, "
                          "0.0.0.0 or an address of this machine") from None
    return settings


@dataclass
class FitCheck:
    """Whether the model fits where it will run: estimated weights + KV cache against what is free."""

    needed: MemoryEstimate
    available: int  # bytes free on the chosen GPUs (within vLLM's fraction), or RAM on the CPU
    where: str  # "GPU 0", "GPUs 0,1", "RAM"
    rough: bool = False  # from the parameter count alone: the model is not downloaded yet

    @property
    def verdict(self) -> str:
        return fit_verdict(self.needed.total, self.available)

    @property
    def needs(self) -> str:
        from engine.format import human_bytes  # it imports this module

        if self.rough:
            kv = " (weights only, until it is downloaded)"
        elif not self.needed.kv_cache:
            kv = " (weights only; no config.json gives the KV cache)"
        else:
            kv = f" (weights {human_bytes(self.needed.weights)} + KV cache {human_bytes(self.needed.kv_cache)})"
        return f"needs about {human_bytes(self.needed.total)} of {human_bytes(self.available)} free {self.where}{kv}"

    def describe(self) -> str:
        return f"{self.needs}: {self.verdict}"


def fit_verdict(needed: int, available: int) -> str:
    """"fits", "tight" (over 85% of what is free) or "does not fit"."""
    if needed > available:
        return "does not fit"
    return "tight" if needed > 0.85 * available else "fits"
