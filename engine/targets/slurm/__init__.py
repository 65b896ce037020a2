"""The SLURM target: the cluster this machine (its login node) submits batch jobs to, "slurm[:PARTITION]".

modeldeck runs on the login node; the work runs in batch jobs on compute nodes, which share a work
directory with it (MODELDECK_SLURM_WORKDIR, --workdir; default MODELDECK_HOME/slurm). A fine-tune is
modeldeck's own entry point in a batch job (finetune.py), a deployment vLLM or the built-in server in one
(serve.py); a supervisor here follows each through the queue (queue.py: one squeue call for all of them)
and its files in the work directory, so a supervisor that is killed loses nothing: the next one finds the
batch job again (`reattaches`). What a job asks for and its script are in batch.py; how SLURM is asked,
in commands.py; how its states read, in states.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog.settings import current as current_settings
from catalog.states import JobKind, ModelKind, ModelState
from engine import hub
from engine.errors import EngineError
from engine.targets import Choice, OptionField, Placement, Serving, Target
from engine.targets.slurm import commands
from engine.targets.slurm.batch import BatchRequest, check_extra, script
from engine.targets.slurm.resources import format_time, parse_memory_mb, parse_time

if TYPE_CHECKING:
    from catalog.schema import Deployment, Job, Model
    from engine.backends import DeploySettings

WORKDIR_ENV = "MODELDECK_SLURM_WORKDIR"
SIGNAL_LEAD_S = 300  # a fine-tune is told to checkpoint this long before its time limit (at most a quarter of it)
# Filesystems that the nodes of a cluster share: a work directory elsewhere is likely this node's alone.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "fuse.sshfs", "ceph",
                      "fuse.ceph", "fuse.cephfs", "panfs", "wekafs", "glusterfs", "fuse.glusterfs", "fuse.juicefs",
                      "orangefs", "pvfs2", "afs", "ocfs2", "gfs2", "9p", "virtiofs", "fuse.weka", "vastnfs"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a partition, an account, a QoS


def workdir(options: dict[str, Any]) -> Path:
    """The work directory the compute nodes share with this machine."""
    from catalog.db import home_dir

    chosen = (options.get("workdir") or current_settings().slurm_workdir).strip()
    return Path(chosen).expanduser().resolve() if chosen else home_dir() / "slurm"


def run_name(kind: str, name: str, uid: str) -> str:
    """A batch job's name and its folder's: md-ft-NAME-UID, md-NAME-UID (squeue finds modeldeck's by md-)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:60]
    return f"md-{'ft-' if kind == 'finetune' else ''}{cleaned}-{uid}"


def deployment_uid(api_key: str) -> str:
    """A deployment's own, from its API key (random, its own), hashed: nothing to store."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:8]


def deployment_run(deployment: Deployment) -> Path:
    """A deployment's run folder in its work directory (its script, its output, where it listens)."""
    from engine.backends import DeploySettings

    workdir = Path(DeploySettings.of(deployment).options.get("workdir", ""))
    return workdir / run_name("deploy", deployment.name, deployment_uid(deployment.api_key))


class SlurmTarget(Target):
    KIND = "slurm"
    TITLE = "SLURM"
    WHERE = "a SLURM partition"
    SYNTAX = "slurm[:PARTITION]"
    GPUS = "count"
    # the node picks its port; the server listens on its address
    DEPLOY_FIELDS = frozenset({"backend", "gpus", "tensor_parallel", "dtype", "max_model_len", "gpu_memory_fraction",
                               "served_name", "max_lora_rank"})
    STOP_DEADLINE_S = 60.0  # the supervisor cancels its batch job and waits for it to leave the node
    DOWNLOADS = True  # into the work directory's cache, by its batch jobs
    OPTIONS = (
        OptionField("account", "Account", "The SLURM account to charge (--account; empty: your default)",
                    "a SLURM account", "your default"),
        OptionField("qos", "QoS", "The quality of service (--qos; empty: the account's default)", "a SLURM QoS",
                    "the default"),
        OptionField("time", "Time limit", "How long the batch job may run, as sbatch takes it: 90, 2:00:00, 1-12:00:00 "
                    "(empty: the partition's default)", "a SLURM time limit", "the partition's default"),
        OptionField("cpus", "CPUs", "CPUs for the batch job (--cpus-per-task; empty: the cluster's default)",
                    "a SLURM CPU count", "the cluster's default"),
        OptionField("mem", "Memory", "Memory for the batch job, like 32G (--mem; empty: the cluster's default)",
                    "SLURM memory", "the cluster's default"),
        OptionField("sbatch", "More sbatch options", "Any other sbatch options, as on its command line, like "
                    "--constraint=a100 --exclusive", "extra sbatch options", "none"),
        OptionField("workdir", "Work directory", f"A folder the compute nodes share with this machine (${WORKDIR_ENV}; "
                    "empty: MODELDECK_HOME/slurm)", "a SLURM work directory", "MODELDECK_HOME/slurm"),
    )

    def __init__(self, spec: str):
        super().__init__(spec)
        self.partition = spec.partition(":")[2]

    @classmethod
    def names(cls, spec: str) -> bool:
        return spec == "slurm" or spec.startswith("slurm:")

    @classmethod
    def parse(cls, spec: str) -> Target:
        partition = spec.partition(":")[2]
        if partition and not _NAME.match(partition):
            raise EngineError(f"SLURM partition {partition!r}: letters, digits and . _ - only")
        return cls(f"slurm:{partition}" if partition else "slurm")

    @classmethod
    def discover(cls) -> list[Choice]:
        if not commands.available():
            return []
        try:
            partitions = commands.cached_partitions()
        except commands.NotConfigured:
            return []  # the client is installed, but this machine is no cluster's: not a target
        return [Choice(f"slurm:{p.name}", f"SLURM {p.name}: {p.describe()}", cls.KIND) for p in partitions.values()]

    @classmethod
    def holding(cls, model: Model) -> Target | None:
        on = model.meta.get("slurm")
        return cls(on["target"]) if on else None

    @classmethod
    def option_placeholder(cls, option: OptionField) -> str:
        if option.name == "workdir":
            return current_settings().slurm_workdir or option.placeholder
        return option.placeholder

    @property
    def label(self) -> str:
        return f"the SLURM partition {self.partition}" if self.partition else "the SLURM cluster"

    def checked(self) -> Target:
        """The partition as the controller knows it (none named: the cluster's default)."""
        if not commands.available():
            raise EngineError("SLURM is not here: sbatch is not on PATH (run modeldeck on the cluster's login node)")
        partitions = commands.cached_partitions()
        if not self.partition:
            default = next((p for p in partitions.values() if p.default), None)
            if default is None:
                raise EngineError("the SLURM cluster has no default partition: name one, like --target slurm:gpu")
            return SlurmTarget(f"slurm:{default.name}")
        if self.partition not in partitions:
            raise EngineError(f"no SLURM partition {self.partition!r}; the cluster has: "
                              f"{', '.join(partitions) or 'none'}")
        if not partitions[self.partition].up:
            raise EngineError(f"the SLURM partition {self.partition!r} is down: jobs would wait there for ever")
        return self

    def options(self, values: dict[str, str], what: str) -> dict[str, Any]:
        """Checked as sbatch reads them; stored as typed (a time limit in SLURM's own form)."""
        chosen = {k: str(v).strip() for k, v in super().options(values, what).items() if str(v).strip()}
        for name in ("account", "qos"):
            if name in chosen and not _NAME.match(chosen[name]):
                raise EngineError(f"{name} {chosen[name]!r}: letters, digits and . _ - only")
        try:
            if "time" in chosen:
                chosen["time"] = format_time(parse_time(chosen["time"]))
            if "mem" in chosen:
                parse_memory_mb(chosen["mem"])
            if "sbatch" in chosen:
                check_extra(chosen["sbatch"])
        except ValueError as exc:
            raise EngineError(str(exc)) from None
        if "cpus" in chosen and (not chosen["cpus"].isdigit() or int(chosen["cpus"]) < 1):
            raise EngineError(f"CPUs {chosen['cpus']!r}: a whole number from 1")
        chosen["workdir"] = str(workdir(chosen))
        return chosen

    # -- what a job asks for, checked ------------------------------------------------------------------

    def request(self, options: dict[str, Any], gpus: int) -> BatchRequest:
        time_s = parse_time(options["time"]) if options.get("time") else None
        return BatchRequest(self.partition, options.get("account", ""), options.get("qos", ""), time_s, gpus,
                            int(options.get("cpus") or 0),
                            parse_memory_mb(options["mem"]) if options.get("mem") else 0,
                            check_extra(options.get("sbatch", "")))

    def gpu_count(self, gpus: str, default: int) -> int:
        choice = (gpus or "auto").strip().lower()
        if choice == "auto":
            return default
        if choice == "cpu":
            return 0
        if not choice.isdigit() or int(choice) > 64:
            raise EngineError(f"GPUs {gpus!r}: on SLURM, give how many GPUs the batch job gets, from 0 (or cpu) to 64")
        return int(choice)

    def check_request(self, request: BatchRequest, options: dict[str, Any], reads: list[str] = ()) -> list[str]:
        """What the partition allows (time, GPUs, CPUs, memory), the work directory, then the controller's own
        verdict (sbatch --test-only: account, QoS, and the rest). Returns warnings (`reads`: other paths the
        job reads, besides this modeldeck and its Python, which may not be shared); refuses the rest."""
        partition = commands.cached_partitions()[self.partition]
        if request.time_s is not None and partition.max_time_s is not None and request.time_s > partition.max_time_s:
            raise EngineError(f"time limit {format_time(request.time_s)} is over the maximum of the partition "
                              f"{self.partition!r}, {format_time(partition.max_time_s)}")
        if request.gpus > partition.max_gpus:
            gpus = f"{request.gpus} GPU{'s' if request.gpus > 1 else ''}"
            raise EngineError(f"{gpus} asked, but no node of the partition {self.partition!r} has more than "
                              f"{partition.max_gpus}")
        if request.cpus > partition.max_cpus:
            raise EngineError(f"{request.cpus} CPUs asked, but no node of the partition {self.partition!r} has more "
                              f"than {partition.max_cpus}")
        if request.mem_mb and partition.max_memory_mb and request.mem_mb > partition.max_memory_mb:
            raise EngineError(f"{options['mem']} of memory asked, but no node of the partition {self.partition!r} has "
                              f"more than {partition.max_memory_mb} MB")
        folder = Path(options["workdir"])
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the runs' data, scripts and models: its owner's
            (folder / "models").mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"the SLURM work directory {folder} cannot be made: {exc.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise EngineError(f"the SLURM work directory {folder} is not writable (--workdir, ${WORKDIR_ENV})")
        warnings = unshared([str(folder), sys.executable, str(Path(__file__).resolve().parents[3]), *reads], partition)
        commands.test_only(script("md-check", request, folder, ["true"], {}), folder)
        return warnings

    # -- fine-tune -------------------------------------------------------------------------------------

    def plan_finetune(self, session, base: Model, gpus: str, options: dict[str, Any],
                      offline: bool = False) -> Placement:
        if base.state == ModelState.READY and not base.path and not base.repo_id:
            raise EngineError(f"{base.name}'s files are not on this machine: a batch job reads them from the shared "
                              "work directory, or downloads a model from the Hub")
        if offline:
            count = self.gpu_count(gpus, 1)
            warnings = []
        else:
            has_gpus = commands.cached_partitions()[self.partition].max_gpus > 0
            count = self.gpu_count(gpus, 1 if has_gpus else 0)
            warnings = self.check_request(self.request(options, count), options, [base.path] if base.path else [])
        where = (f"{count} GPU{'s' if count > 1 else ''}" if count else "CPU") + f" in a batch job on {self.label}" + \
            (f" for up to {options['time']}" if options.get("time") else "") + \
            ("" if base.path else f"; the job downloads {base.repo_id} from the Hub") + \
            "".join(f"; {w}" for w in warnings)
        return Placement(self, ",".join(map(str, range(count))) or "cpu", count, where, files_here=True,
                         details={"options": options}, output_folder=Path(options["workdir"]) / "models")

    def finetune_meta(self, placement: Placement, name: str) -> dict[str, Any]:
        uid = secrets.token_hex(4)
        run = Path(placement.details["options"]["workdir"]) / run_name("finetune", name, uid)
        return {"slurm": {"target": self.spec, "options": placement.details["options"], "gpus": placement.gpu_count,
                          "uid": uid, "run": str(run)}}

    def run_finetune(self, ctx) -> None:
        from engine.targets.slurm.finetune import SlurmFinetune

        SlurmFinetune(ctx, self).run()

    def finetune_script(self, name: str, run_dir: Path, options: dict, gpus: int, downloads: bool = False) -> str:
        """The fine-tune's batch script: SIGUSR1 (a checkpoint) a while before its time limit; `downloads`:
        its base comes from the Hub, into the work directory's cache."""
        time_s = parse_time(options["time"]) if options.get("time") else None
        lead = min(SIGNAL_LEAD_S, max(10, time_s // 4)) if time_s else SIGNAL_LEAD_S
        return script(run_dir.name, self.request(options, gpus), run_dir,
                      [sys.executable, "-m", "engine.jobs.finetune", "--spec", str(run_dir / "finetune.json")],
                      job_exports(options, downloads), signal_lead_s=lead)

    def dry_run_finetune(self, name: str, placement: Placement, base: Model, dataset_path, hyperparameters: dict,
                         options: dict) -> tuple[str, str]:
        on = self.finetune_meta(placement, name)["slurm"]
        run_dir = Path(on["run"])
        text = self.finetune_script(name, run_dir, options, placement.gpu_count, downloads=not base.path)
        return text, (f"# {name}: batch job {run_dir.name}; its spec, data and log go to {run_dir}, the adapter to "
                      f"{Path(options['workdir']) / 'models' / name}")

    # -- deploy ----------------------------------------------------------------------------------------

    def plan_deploy(self, session, model: Model, base: Model | None, settings: DeploySettings,
                    kept_ports: set[int], available_gpus, adapters: list[tuple[str, Model]] = ()) -> Serving:
        weights = base or model
        for _, adapter in adapters:
            self.adapter_path(None, adapter)  # its files here: the batch job reads them through the shared filesystem
        for needed in filter(None, (model, base)):
            if needed.state != ModelState.READY:
                raise EngineError(f"{needed.name!r} is {needed.state.value}; deploy it once it is Ready")
        if not weights.path and not (weights.repo_id and weights.kind == ModelKind.BASE):
            raise EngineError(f"{weights.name}'s files are not on this machine: a batch job serves files from the "
                              "shared work directory, or downloads a model from the Hub")
        if base is not None and not model.path:
            raise EngineError(f"{model.name}'s files are not on this machine: its batch job needs them")
        settings = self.serving_settings(settings, commands.cached_partitions()[self.partition].max_gpus > 0)
        backend, count = settings.backend, int(settings.gpus)
        warnings = self.check_request(self.request(settings.options, count), settings.options,
                                      [p for p in (model.path, base.path if base else None,
                                                   *(a.path for _, a in adapters)) if p])
        warnings.append("listens on its node's address, reachable on the cluster's network (with the API key)")
        server = "vLLM" if backend == "vllm" else "built-in server"
        where = f"{count} GPU{'s' if count != 1 else ''}" if count else "the CPU"
        return Serving(settings, backend, str(count), None, None, warnings, "submitting its batch job",
                       f"{server} on {where} in a batch job on {self.label}",
                       "by SLURM, on a node of the partition with the GPUs, CPUs and memory it asks for")

    def serving_settings(self, settings: DeploySettings, has_gpus: bool) -> DeploySettings:
        """The server and the GPUs a deployment's batch job gets (auto: vLLM where the job gets GPUs and vLLM
        is installed, the built-in server otherwise), checked; it listens on its node's address, on a port the
        node picks."""
        import dataclasses

        from engine.backends import vllm_available

        count = self.gpu_count(settings.gpus, settings.tensor_parallel if has_gpus else 0)
        backend = settings.backend
        if backend == "auto":
            backend = "vllm" if count and vllm_available() else "transformers"
        if backend == "vllm" and not count:
            raise EngineError("vLLM needs GPUs: give the batch job some (GPUs), or choose the built-in server")
        if backend == "vllm" and settings.tensor_parallel > count:
            raise EngineError(f"tensor-parallel size {settings.tensor_parallel} needs as many GPUs; the batch job gets "
                              f"{count}")
        if backend == "transformers" and settings.tensor_parallel > 1:
            raise EngineError("tensor parallel needs vLLM; the built-in server runs a model on one device")
        return dataclasses.replace(settings, host="0.0.0.0", port=0, backend=backend, gpus=str(count))

    def serve(self, ctx, deployment: Deployment, model: Model, base: Model | None,
              adapters: list[tuple[str, Model]]) -> None:
        from engine.targets.slurm.serve import serve

        serve(ctx, self, deployment, model, base, adapters)

    def server_script(self, deployment_name: str, api_key: str, run_dir: Path, settings: DeploySettings,
                      served_name: str, model: Model, base: Model | None,
                      adapters: list[tuple[str, Model]] = ()) -> tuple[str, dict[str, str]]:
        """The batch script of a deployment, and the environment sbatch gives it (its API key: never in the
        script)."""
        import dataclasses

        from engine.backends import base_served_name, builtin_command, vllm_command

        weights = base or model
        path = weights.path or weights.repo_id  # vLLM downloads a Hub model itself
        listen = dataclasses.replace(settings, host="0.0.0.0", port=0)
        build = vllm_command if settings.backend == "vllm" else builtin_command
        command = build(path, listen, base_served_name(served_name, model), api_key, "cpu",
                        [(name, adapter.path) for name, adapter in adapters])
        # The node chooses the port (the launcher fills it in); SLURM chooses the GPUs (CUDA_VISIBLE_DEVICES).
        argv = ["{port}" if i and command.argv[i - 1] == "--port" else part for i, part in enumerate(command.argv)]
        secret = {k: v for k, v in command.env.items() if k.endswith("API_KEY")}
        launcher = [sys.executable, "-m", "engine.targets.slurm.launch", str(run_dir / "endpoint.json"), *secret,
                    "--", *argv]
        # vLLM's adapter routes (loading while it serves, and after a requeue), through the same environment
        secret |= {k: v for k, v in command.env.items() if k == "VLLM_ALLOW_RUNTIME_LORA_UPDATING"}
        exports = job_exports(settings.options, downloads=not weights.path)
        if not weights.path and (token := hub.token()):  # the job downloads it (a gated one, with the user's token)
            secret["HF_TOKEN"] = token
        return script(run_dir.name, self.request(settings.options, int(settings.gpus or 0)), run_dir, launcher,
                      exports), secret

    def dry_run_deploy(self, name: str, model: Model, base: Model | None, settings: DeploySettings,
                       adapters: list[tuple[str, Model]] = ()) -> tuple[str, str]:
        try:  # as the deployment would choose, where the controller says what the partition has
            has_gpus = commands.cached_partitions()[self.checked().partition].max_gpus > 0
        except EngineError:
            has_gpus = True
        settings = self.serving_settings(settings, has_gpus)
        run_dir = Path(settings.options["workdir"]) / run_name("deploy", name, "UID")
        text, _secret = self.server_script(name, "KEY", run_dir, settings, settings.served_name or model.name, model,
                                           base, adapters)
        return text, (f"# {name}: batch job {run_dir.name}; its API key goes in sbatch's environment "
                      "(MODELDECK_API_KEY or VLLM_API_KEY), never in the script")

    def serving_command(self, deployment: Deployment, model: Model | None, base: Model | None,
                        adapters: list[tuple[str, Model]] = ()) -> str:
        from engine.backends import DeploySettings

        workdir = DeploySettings.of(deployment).options.get("workdir", "?")
        server = "vLLM" if deployment.backend == "vllm" else "the built-in server"
        return (f"{server} in a batch job on {self.label} (deploy --target {self.spec} --dry-run prints its script; "
                f"its work directory is {workdir})")

    def listening(self, deployment: Deployment) -> tuple[str, bool]:
        """On its node's address, at the port the node picked (reported once it runs)."""
        from urllib.parse import urlsplit

        reported = urlsplit(deployment.endpoint or "")
        return (f"{reported.hostname}:{reported.port}" if reported.port else "its node's address, once it runs"), True

    def connect_fields(self, deployment: Deployment) -> list[tuple[str, str, str]]:
        if deployment.ends_at is None:
            return []
        from engine.format import human_duration, human_time

        left = human_duration(deployment.ends_at - time.time())
        return [("Time left", f"{left}, until {human_time(deployment.ends_at)}",
                 "  (its batch job's time limit; deploy again with a longer --time)")]

    def laptop_tunnel(self, deployment: Deployment) -> tuple[str, str] | None:
        """Through this login node to the compute node (whether this session came over SSH or not: a laptop
        reaches the cluster's nodes only through it)."""
        from urllib.parse import urlsplit

        from engine.connect import ssh_command

        if not deployment.endpoint:
            return None
        parts = urlsplit(deployment.endpoint)
        return ssh_command(parts.port, parts.hostname, parts.port), f"http://127.0.0.1:{parts.port}/v1"

    # -- reconciling: a batch job outlives its supervisor ----------------------------------------------

    def reattaches(self, job: Job) -> bool:
        return job.kind in (JobKind.FINETUNE, JobKind.SERVE)

    def orphaned(self, job: Job) -> str:
        return "; its batch job is cancelled" if job.loads(job.metrics_json, {}).get("slurm_run") else ""

    def abandon(self, job: Job) -> None:
        """Settled without its supervisor (stopped, or re-attached too often): its batch jobs end too."""
        from engine.targets.slurm.run import cancel_all

        if run := job.loads(job.metrics_json, {}).get("slurm_run"):
            cancel_all(Path(run))

    # -- models whose files are in the work directory -------------------------------------------------

    def location(self, model: Model) -> str | None:
        if model.path:
            return f"{model.path} (the SLURM work directory, shared with the compute nodes)"
        return f"downloaded from the Hub by its batch jobs on {self.label}"

    def files_here(self, model: Model) -> bool:
        return bool(model.path)

    def lives_there(self) -> dict[str, Any]:
        return {"slurm": {"target": self.spec}}

    def refuse_here(self, model: Model, doing: str) -> EngineError:
        return EngineError(f"{model.name} lives on {self.label}, whose batch jobs download it: {doing} it there, or "
                           f"download it here first (modeldeck pull {model.repo_id or model.name})")

    def owns_files(self, model: Model) -> bool:
        return bool(model.meta["slurm"].get("run"))

    def delete_files(self, model: Model) -> None:
        """Its run's folder in the work directory (script, spec, data, log; the adapter is its path), and
        any batch job of it still there (its supervisor stops it first, normally)."""
        from engine.targets.slurm.run import cancel_all

        if run := model.meta["slurm"].get("run"):
            cancel_all(Path(run))
            shutil.rmtree(run, ignore_errors=True)

    def delete_deployment(self, deployment: Deployment) -> None:
        from engine.targets.slurm.run import cancel_all

        run_dir = deployment_run(deployment)
        cancel_all(run_dir)  # normally its supervisor ended it already
        shutil.rmtree(run_dir, ignore_errors=True)


def job_exports(options: dict[str, Any], downloads: bool = False) -> dict[str, str]:
    """What a batch job's command needs beyond sbatch's copy of this environment: this very modeldeck on its
    path, unbuffered output; for a model from the Hub, the work directory's cache, shared by its jobs."""
    root = str(Path(__file__).resolve().parents[3])
    exports = {"PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}
    if downloads:
        exports["HF_HOME"] = str(Path(options["workdir"]) / "hf")
    return exports


def unshared(paths: list[str], partition: commands.Partition) -> list[str]:
    """Warnings for the paths a batch job reads (the work directory first) that are likely not seen by the
    partition's nodes: on a filesystem that is this machine's own."""
    import psutil

    here = socket.gethostname().split(".")[0]
    if partition.nodes and all(node.name.split(".")[0] == here for node in partition.nodes):
        return []  # the partition's one node is this machine
    mounts = sorted(psutil.disk_partitions(all=True), key=lambda m: len(m.mountpoint), reverse=True)
    warnings = []
    for i, path in enumerate(paths):
        mount = next((m for m in mounts if path.startswith(m.mountpoint.rstrip("/") + "/") or path == m.mountpoint),
                     None)
        if mount is None or mount.fstype.lower() in SHARED_FILESYSTEMS:
            continue
        what = "the work directory" if i == 0 else "what the batch job runs or reads:"
        hint = f" (--workdir or ${WORKDIR_ENV}: a folder on the cluster's shared storage)" if i == 0 else ""
        warnings.append(f"{what} {path} is on a {mount.fstype} filesystem, which the compute nodes may not share{hint}")
    return warnings
