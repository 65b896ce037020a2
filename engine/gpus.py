"""The machine's GPUs: read through NVML (nvidia-ml-py, NVIDIA's own binding, as nvitop reads them; never torch,
never a `nvidia-smi` process per refresh), who holds each one (a modeldeck deployment or job, or another
process), and which ones "auto" chooses.

Everything past the reader is a function of the readings (`Gpu`) and of what modeldeck runs (`Claim`), so it
is tested on those types where there is no GPU."""

from __future__ import annotations

import functools
import importlib.util
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from catalog.sqlite import Database

    from catalog.schema import Deployment, Job

MIB = 2**20


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    memory_mb: int | None  # None where the driver does not say (some containers)


@dataclass(frozen=True)
class Gpu:
    index: int  # as nvidia-smi numbers it (PCI bus order; CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA agree)
    name: str
    memory_total_mb: int
    memory_used_mb: int
    utilization: int | None = None  # percent of the last sample period the GPU was busy
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    nvlink: frozenset[int] = frozenset()  # the other GPUs it reaches over NVLink
    mig: bool = False  # split into MIG instances: a GPU number does not address them (auto leaves it)

    @property
    def memory_free_mb(self) -> int:
        return self.memory_total_mb - self.memory_used_mb

    def describe(self) -> str:
        return f"GPU {self.index}: {self.name}, {self.memory_free_mb / 1024:.0f} of {self.memory_total_mb / 1024:.0f} GiB free"


# -- the reader ----------------------------------------------------------------------------------------

class _Nvml:
    """One NVML session for the process, opened on the first read and kept (the topology is read once with
    it). No driver, no library: no GPUs, and not asked again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: list | None = None
        self._links: dict[int, frozenset[int]] = {}

    def _open(self) -> list:
        try:
            import pynvml
        except ImportError:  # nvidia-ml-py is a dependency; a broken install reads as no GPU
            return []
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - NVMLError, or the binding's mismatch errors (not NVMLError's)
            return []
        for (i, a), (j, b) in itertools.combinations(enumerate(handles), 2):
            try:
                linked = pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK) == \
                    pynvml.NVML_P2P_STATUS_OK
            except Exception:  # noqa: BLE001 - not supported here
                linked = False
            if linked:
                self._links[i] = self._links.get(i, frozenset()) | {j}
                self._links[j] = self._links.get(j, frozenset()) | {i}
        return handles

    def read(self) -> list[Gpu]:
        with self._lock:
            if self._handles is None:
                self._handles = self._open()
            if not self._handles:
                return []
            import pynvml

            return [self._read_one(pynvml, index, handle) for index, handle in enumerate(self._handles)]

    def _read_one(self, nvml, index: int, handle) -> Gpu:
        def ask(call, *args, default=None):
            try:
                return call(handle, *args)
            except Exception:  # noqa: BLE001 - not supported on this GPU or driver, not permitted to this user
                return default

        memory = ask(nvml.nvmlDeviceGetMemoryInfo)
        rates = ask(nvml.nvmlDeviceGetUtilizationRates)
        power, limit = ask(nvml.nvmlDeviceGetPowerUsage), ask(nvml.nvmlDeviceGetEnforcedPowerLimit)
        name = ask(nvml.nvmlDeviceGetName, default="GPU")
        processes = {}
        listings = [(nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetComputeRunningProcesses_v2),
                    (nvml.nvmlDeviceGetGraphicsRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses_v2)]
        for latest, older in listings:  # an older driver lacks the latest call
            found = ask(latest)
            for proc in (found if found is not None else ask(older, default=[])) or []:
                used = proc.usedGpuMemory
                processes[proc.pid] = GpuProcess(proc.pid, used // MIB if isinstance(used, int) else None)
        mig = ask(nvml.nvmlDeviceGetMigMode)
        return Gpu(index, name.decode() if isinstance(name, bytes) else name,
                   memory.total // MIB if memory else 0, memory.used // MIB if memory else 0,
                   rates.gpu if rates else None, ask(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
                   power / 1000 if power is not None else None, limit / 1000 if limit is not None else None,
                   tuple(processes.values()), self._links.get(index, frozenset()), bool(mig and mig[0]))


_nvml = _Nvml()


def list_gpus() -> list[Gpu]:
    """The CUDA GPUs with their memory, load and processes now; empty where there is no NVIDIA driver.
    A few milliseconds once NVML is open: fine for a worker's refresh, never for the UI thread."""
    return _nvml.read()


@functools.cache
def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


# -- who holds each GPU ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """Live modeldeck work on this machine that was given GPUs: a deployment's server or a fine-tune."""

    what: str  # "deployment qwen", "fine-tune job 7 (my-lora)"
    gpus: frozenset[int]
    pid: int | None = None  # its job's process: a GPU process under it is this work's
    pid_started_at: float | None = None  # that process's start time: a reused pid is not taken for it


@dataclass(frozen=True)
class ProcessInfo:
    """A process seen on a GPU, as this machine's process table tells it."""

    pid: int
    user: str
    command: str
    lineage: tuple[tuple[int, float], ...]  # itself, then its parents: (pid, start time)


@dataclass(frozen=True)
class Holder:
    what: str  # "deployment qwen", or "pid 4242 (alice): python train.py"
    ours: bool
    memory_mb: int | None = None  # what its processes use on this GPU; None: given it, not using it yet
    pids: tuple[int, ...] = ()
    user: str | None = None
    command: str | None = None


@dataclass(frozen=True)
class GpuState:
    """One GPU of the ledger: its reading and who holds it."""

    gpu: Gpu
    holders: tuple[Holder, ...]

    @property
    def held_by_us(self) -> list[str]:
        return [h.what for h in self.holders if h.ours]

    @property
    def others(self) -> list[Holder]:
        return [h for h in self.holders if not h.ours]


def _claim_of(info: ProcessInfo | None, claims: Iterable[Claim]) -> Claim | None:
    from engine.jobs import same_start

    if info is None:
        return None
    for claim in claims:
        for pid, started in info.lineage:
            if pid == claim.pid and same_start(started, claim.pid_started_at):
                return claim
    return None


def holders(gpu: Gpu, claims: list[Claim], processes: dict[int, ProcessInfo]) -> tuple[Holder, ...]:
    """Who holds the GPU: modeldeck work whose processes use it (a process under its job's process) or that
    was given it (a server still loading), then every other process on it, biggest first."""
    ours: dict[Claim, list[GpuProcess]] = {}
    foreign = []
    for proc in gpu.processes:
        info = processes.get(proc.pid)
        claim = _claim_of(info, claims)
        if claim is not None:
            ours.setdefault(claim, []).append(proc)
        else:
            foreign.append((proc, info))
    for claim in claims:
        if gpu.index in claim.gpus:
            ours.setdefault(claim, [])
    found = [Holder(claim.what, True, _total(procs) if procs else None, tuple(p.pid for p in procs))
             for claim, procs in ours.items()]
    foreign.sort(key=lambda pair: -(pair[0].memory_mb or 0))
    for proc, info in foreign:
        if info is None:  # another container's, or gone since the reading
            found.append(Holder(f"pid {proc.pid} (not visible from here)", False, proc.memory_mb, (proc.pid,)))
        else:
            found.append(Holder(f"pid {proc.pid} ({info.user}): {info.command}", False, proc.memory_mb,
                                (proc.pid,), info.user, info.command))
    return tuple(found)


def _total(procs: list[GpuProcess]) -> int | None:
    known = [p.memory_mb for p in procs if p.memory_mb is not None]
    return sum(known) if known else None


def ledger(gpus: list[Gpu], claims: list[Claim], processes: dict[int, ProcessInfo]) -> list[GpuState]:
    return [GpuState(gpu, holders(gpu, claims, processes)) for gpu in gpus]


def claims_of(deployments: Iterable[Deployment], jobs: Iterable[Job], host: str) -> list[Claim]:
    """The live deployments and unfinished fine-tunes (and merges) on this machine, with the GPUs their
    targets gave them here. A serving job is its deployment's; downloads and imports use no GPU."""
    from catalog.states import JobKind
    from engine import targets

    jobs = {job.id: job for job in jobs}
    found = []
    for dep in deployments:
        if not dep.state.is_live() or dep.backend == "external":
            continue
        job = jobs.get(dep.job_id)
        if job is not None and job.host and job.host != host:
            continue  # a shared MODELDECK_HOME: its server runs on another login node
        given = targets.of_deployment(dep).gpus_here(dep.gpus)
        found.append(Claim(f"deployment {dep.name}", given, job.pid if job else None,
                           job.pid_started_at if job else None))
    for job in jobs.values():
        if job.kind not in (JobKind.FINETUNE, JobKind.MERGE) or job.state.is_terminal() or \
                (job.host and job.host != host):
            continue
        given = targets.of_job(job).gpus_here(job.params.get("gpus"))
        if given or job.pid:
            what = "fine-tune" if job.kind == JobKind.FINETUNE else "merge"
            found.append(Claim(f"{what} job {job.id}" + (f" ({job.title})" if job.title else ""), given, job.pid,
                               job.pid_started_at))
    return found


def process_info(pids: Iterable[int]) -> dict[int, ProcessInfo]:
    """What the process table says of the processes on the GPUs (those visible from here). In a container
    NVML may give the host's pids: one that is another process here is named as that process (modeldeck's
    own are matched by start time too, so never mistaken)."""
    import psutil

    found = {}
    for pid in set(pids):
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                command = " ".join(proc.cmdline()) or proc.name()
                user = proc.username()
                lineage = [(pid, proc.create_time())]
            for parent in proc.parents():
                lineage.append((parent.pid, parent.create_time()))
        except (psutil.Error, OSError):
            continue
        found[pid] = ProcessInfo(pid, user, command, tuple(lineage))
    return found


def read_ledger(db: Database) -> list[GpuState]:
    """The GPUs now, with who holds each: NVML, the database's live work, the process table."""
    gpus = list_gpus()
    if not gpus:
        return []
    with db.read() as session:
        return ledger_in(session, gpus)


def ledger_in(session, gpus: list[Gpu]) -> list[GpuState]:
    """The ledger of these readings, with the live work the session sees."""
    if not gpus:
        return []
    return ledger(gpus, _claims_in(session), process_info(p.pid for g in gpus for p in g.processes))


def given_here(session) -> dict[int, list[str]]:
    """The GPUs of this machine given to live modeldeck work, by the database alone (under a write lock, so
    two deployments started at once cannot both take one by auto)."""
    given: dict[int, list[str]] = {}
    for claim in _claims_in(session):
        for index in claim.gpus:
            given.setdefault(index, []).append(claim.what)
    return given


def _claims_in(session) -> list[Claim]:
    from sqlmodel import select

    from catalog.schema import Deployment, Job
    from catalog.states import LIVE_DEPLOYMENT_STATES, JobState
    from engine.jobs import HERE

    deployments = list(session.exec(select(Deployment).where(Deployment.state.in_(LIVE_DEPLOYMENT_STATES))))
    job_ids = {d.job_id for d in deployments if d.job_id}
    jobs = list(session.exec(select(Job).where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]) | Job.id.in_(job_ids))))
    return claims_of(deployments, jobs, HERE)


@dataclass
class GpuHistory:
    """The last readings of each GPU (utilisation and memory used, in percent; None where NVML does not say,
    as on a MIG GPU), for the ledger's sparklines."""

    keep: int = 60
    utilization: dict[int, deque] = field(default_factory=dict)
    memory: dict[int, deque] = field(default_factory=dict)

    def add(self, gpus: list[Gpu]) -> None:
        for gpu in gpus:
            self.utilization.setdefault(gpu.index, deque(maxlen=self.keep)).append(gpu.utilization)  # None: unknown
            self.memory.setdefault(gpu.index, deque(maxlen=self.keep)).append(
                100 * gpu.memory_used_mb / gpu.memory_total_mb if gpu.memory_total_mb else 0)


# -- choosing GPUs -----------------------------------------------------------------------------------------

def choices(gpus: list[Gpu]) -> list[tuple[str, str]]:
    """The GPU choices a dialog offers, as (label, value as `place` takes it)."""
    if not gpus:
        return [("auto: CPU (no NVIDIA GPU here)", "auto"), ("CPU", "cpu")]
    return [("auto: the freest GPU no deployment holds", "auto"), *((gpu.describe(), str(gpu.index)) for gpu in gpus),
            ("all GPUs", ",".join(str(g.index) for g in gpus)), ("CPU", "cpu")]


def cuda_env(gpus: str) -> dict[str, str]:
    """The environment that shows a process only the chosen GPUs ("cpu": none), numbered as nvidia-smi
    numbers them (CUDA's own default order is fastest first)."""
    return {"CUDA_VISIBLE_DEVICES": "" if gpus == "cpu" else gpus, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def is_auto(choice: str | None) -> bool:
    return (choice or "auto").strip().lower() == "auto"


def parse_choice(choice: str, available: list[Gpu]) -> str:
    """A GPU choice as the user types it ("cpu", "0", "0,1") checked against what is here; returns the
    normalized choice ("cpu" or a comma list of indexes). "auto" is the CPU where there is no GPU; where there
    are GPUs, `choose` decides it."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        if available:
            raise ValueError("auto: `place` chooses among the GPUs here")
        return "cpu"
    if choice == "cpu":
        return "cpu"
    try:
        wanted = [int(part) for part in choice.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"GPUs {choice!r}: expected auto, cpu, or GPU numbers like 0 or 0,1") from None
    known = {gpu.index for gpu in available}
    if missing := [i for i in wanted if i not in known]:
        have = ", ".join(map(str, sorted(known))) or "none (no NVIDIA GPU found)"
        raise ValueError(f"no GPU {', '.join(map(str, missing))} on this machine; GPUs here: {have}")
    if not wanted:
        raise ValueError("GPUs: give at least one number, or cpu")
    return ",".join(map(str, wanted))


@dataclass(frozen=True)
class Choice:
    gpus: str  # "cpu" or a comma list of indexes
    why: str = ""  # what auto chose and why, for the drawer and the fine-tune dialog
    shared: str = ""  # GPUs typed that modeldeck work holds already: a warning


def _gib(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb < 10 * 1024 else f"{mb / 1024:.0f} GiB"


def choose(states: list[GpuState], count: int = 1, needed_bytes: int | None = None, share: float = 1.0) -> Choice:
    """What "auto" means where there are GPUs: `count` GPUs that no other modeldeck work holds, those with
    the most free memory that fit `needed_bytes` (spread evenly over them; `share` of each GPU at most, as
    vLLM takes), linked by NVLink where a set of them is. Raises ValueError when no such GPUs are left."""
    if not states:
        return Choice("cpu")  # nothing to choose: the plan says it runs on the CPU
    if len(states) < count:
        raise ValueError(f"auto needs {count} GPUs and this machine has {len(states)}; lower the tensor-parallel "
                         "size")
    taken = {s.gpu.index: s.held_by_us for s in states if s.held_by_us}
    mig = [s.gpu.index for s in states if s.gpu.mig and s.gpu.index not in taken]
    open_ = [s.gpu for s in states if s.gpu.index not in taken and not s.gpu.mig]
    held_words = "; ".join(f"GPU {i}: {', '.join(who)}" for i, who in taken.items())
    if mig:
        held_words = "; ".join(filter(None, [held_words, f"GPU {', '.join(map(str, mig))}: MIG instances"]))
    if len(open_) < count:
        need = "a GPU" if count == 1 else f"{count} GPUs"
        raise ValueError(f"auto needs {need} that no modeldeck work holds, and {len(open_)} of {len(states)} "
                         f"{'is' if len(open_) == 1 else 'are'} free of it ({held_words}): choose GPUs by number "
                         "to share them, or cpu")

    def room(gpu: Gpu) -> float:
        """What the work may use of it: vLLM takes `share` of the whole GPU, and refuses to start where
        less than that is free."""
        if share < 1 and gpu.memory_free_mb < gpu.memory_total_mb * share:
            return 0.0
        return min(gpu.memory_free_mb, gpu.memory_total_mb * share)

    per_gpu = needed_bytes / count / MIB if needed_bytes else 0

    def rank(group: tuple[Gpu, ...]) -> tuple:
        fits = all(room(g) >= per_gpu for g in group) and (share >= 1 or all(room(g) > 0 for g in group))
        linked = all(b.index in a.nvlink for a, b in itertools.combinations(group, 2))
        return fits, linked, min(g.memory_free_mb for g in group), -group[0].index

    best = max(itertools.combinations(open_, count), key=rank)
    fits, linked, _, _ = rank(best)
    indexes = ",".join(str(g.index) for g in best)
    if count == 1:
        gpu = best[0]
        why = f"auto: GPU {gpu.index}, the most free memory ({_gib(gpu.memory_free_mb)} of {_gib(gpu.memory_total_mb)})"
    else:
        free = ", ".join(_gib(g.memory_free_mb) for g in best)
        freest = max(itertools.combinations(open_, count), key=lambda group: min(g.memory_free_mb for g in group))
        why = f"auto: GPUs {indexes}, " + (f"linked by NVLink ({free} free)" if linked and freest != best else
                                            f"the most free memory ({free} free)" + (", linked by NVLink" if linked
                                                                                     else ""))
    if not fits and (per_gpu or share < 1):
        why += "; none left has room for it"
    if held_words:
        why += f" (held by modeldeck: {held_words})" if not mig else f" (left: {held_words})"
    return Choice(indexes, why)


def place(choice: str | None, states: list[GpuState], count: int = 1, needed_bytes: int | None = None,
          share: float = 1.0) -> Choice:
    """The GPUs for work asked to run on `choice`: auto's choice (see `choose`), or the GPUs typed, checked,
    with a word where modeldeck work holds them already (the user may share a GPU; auto never does)."""
    if is_auto(choice):
        return choose(states, count, needed_bytes, share)
    gpus = parse_choice(choice, [s.gpu for s in states])
    shared = [f"GPU {s.gpu.index} is held by {', '.join(s.held_by_us)} too" for s in states
              if gpus != "cpu" and str(s.gpu.index) in gpus.split(",") and s.held_by_us]
    return Choice(gpus, shared="; ".join(shared))


# -- what a failure on a GPU means -------------------------------------------------------------------------

OOM_SIGNS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory",
             "No available memory for the cache blocks",  # vLLM: the KV cache finds no room
             "is less than desired GPU memory utilization")  # vLLM: less free than its share at start


def says_out_of_memory(log_tail: str) -> bool:
    return any(sign in log_tail for sign in OOM_SIGNS)


def out_of_memory_reason(log_tail: str, given: list[int], states: list[GpuState], mine: str) -> str | None:
    """A deployment or job that died of CUDA out of memory: which of its GPUs, and who else holds them now
    (`mine`: its own claim's name, left out). None when the log says nothing of memory."""
    if not says_out_of_memory(log_tail):
        return None
    by_index = {s.gpu.index: s for s in states}
    parts = []
    for index in given:
        state = by_index.get(index)
        if state is None:
            continue
        others = [h for h in state.holders if h.what != mine and h.memory_mb]
        used = f"{_gib(state.gpu.memory_used_mb)} of {_gib(state.gpu.memory_total_mb)} in use"
        who = "; ".join(f"{h.what} has {_gib(h.memory_mb)}" for h in others)
        parts.append(f"GPU {index}: {used}" + (f", {who}" if who else ""))
    where = "GPU " + ",".join(map(str, given)) if given else "its GPU"
    return f"CUDA out of memory on {where}" + (f" ({'; '.join(parts)})" if parts else "")


def out_of_memory_here(db: Database, given: str | None, mine: str, log_tail: str) -> str | None:
    """`out_of_memory_reason` with the GPUs as they are now (read only when the log speaks of memory)."""
    if not given or given == "cpu" or not says_out_of_memory(log_tail):
        return None  # nothing to say: no GPU given, or the log does not speak of memory
    indexes = [int(part) for part in given.split(",") if part.strip().isdigit()]
    return out_of_memory_reason(log_tail, indexes, read_ledger(db), mine)
