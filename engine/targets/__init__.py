"""Targets: where a fine-tune or a deployment runs — this machine, a Kubernetes context, a SLURM cluster.

Each target is one package (local/, kubernetes/, slurm/) behind the Target interface below. A target is
named by its spec, the text a user types and modeldeck stores: "" for this machine, "CONTEXT[/NAMESPACE]"
for a context of the user's kubeconfig, "slurm[:PARTITION]" for the SLURM cluster this machine submits
to. `resolve` turns a spec into its Target, `choices` lists the targets this machine can use now,
`home_of` says where a model's files are, `of_job` where a job's work runs. Screens, the CLI and the
engine's operations call the interface; none of them asks which target it is.

Light at import (the dashboard's first paint imports engine.format, which asks `home_of`): each target's
package is imported when first named, and imports its client libraries only when it talks to its system.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import EngineError

if TYPE_CHECKING:
    from catalog.schema import Deployment, Job, Model
    from engine.backends import DeploySettings, FitCheck
    from engine.datasets import Dataset
    from engine.gpus import Gpu
    from engine.jobs.harness import JobContext


@dataclass(frozen=True)
class OptionField:
    """A setting a target takes beyond the common ones: a row in the dialogs, a flag in the CLI."""

    name: str  # its key among a plan's options
    label: str
    help: str  # the dialogs' help line and the flag's help
    what: str  # what it is, in a refusal: "a vLLM image", "a SLURM account"
    placeholder: str = ""
    uses: tuple[str, ...] = ("deploy", "finetune")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass
class Choice:
    """A target the dialogs offer: its spec (without its SPEC_FIELD), how it is listed, and its kind (which
    option rows it shows)."""

    spec: str
    label: str
    kind: str
    field_default: str = ""  # its SPEC_FIELD's value when none is typed (a Kubernetes context's own namespace)


@dataclass
class Placement:
    """Where a fine-tune runs, as its plan checked it: the GPUs as the run will see them, in words, and
    what the target needs to start it (`details`, its own)."""

    target: Target
    gpus: str  # "cpu" or the comma list of GPU indexes the run sees
    gpu_count: int
    where: str  # "GPU 0", "CPU", "2 GPUs on the cluster emu/ml, in IMAGE"
    files_here: bool  # the adapter is written on this machine (MODELDECK_HOME/models/NAME)
    bitsandbytes: bool | None = None  # whether QLoRA's package is there (None: look on this machine)
    details: Any = None
    output_folder: Path | None = None  # where its adapter's folder goes (None: MODELDECK_HOME/models)
    chosen_because: str = ""  # what "auto" chose and why, or a warning on GPUs typed that others hold

    def check(self, dataset: Dataset) -> None:
        """Refuse a dataset the target cannot take (a Kubernetes Job gets it through Secrets)."""
        self.target.check_dataset(self, dataset)


@dataclass
class Serving:
    """Where a deployment runs, as its plan checked it: the settings as they will be used, the server, the
    GPUs, the fit (None where a scheduler judges it) and the endpoint as far as it is known before start."""

    settings: DeploySettings
    backend: str  # vllm | transformers | kubernetes
    gpus: str
    fit: FitCheck | None
    endpoint: str | None  # None until the target reports it (a batch job's node and port)
    warnings: list[str] = field(default_factory=list)
    first_phase: str = "starting"  # "waiting for the download" for a model still downloading here
    summary: str = ""  # what runs where, for the drawer's plan line ("vLLM on GPU 0, 127.0.0.1:8001")
    placed_by: str = ""  # who judges the fit where there is no fit check: a cluster's scheduler
    chosen_because: str = ""  # what "auto" chose and why (the drawer's "Chosen" line)


class Target(ABC):
    KIND: ClassVar[str]
    TITLE: ClassVar[str]  # "this machine", "Kubernetes", "SLURM": in refusals and help
    WHERE: ClassVar[str] = ""  # what one of its kind is, for the Target field's help: "a SLURM partition"
    SYNTAX: ClassVar[str] = ""  # how its spec is typed: "slurm[:PARTITION]"
    OPTIONS: ClassVar[tuple[OptionField, ...]] = ()
    # How GPUs are chosen: "here" (this machine's, by number, as `--gpus 0,1`) or "count" (how many a
    # pod or a batch job gets).
    GPUS: ClassVar[str] = "count"
    # The common deploy settings this target uses (the drawer shows their rows; the others are its own).
    DEPLOY_FIELDS: ClassVar[frozenset[str]] = frozenset()
    STOP_DEADLINE_S: ClassVar[float] = 5.0  # what a stop waits for the supervisor before killing it
    DOWNLOADS: ClassVar[bool] = False  # it downloads a model from the Hub itself (nothing is downloaded here)
    # A part of the spec typed beside the Target field (a Kubernetes context's namespace), if it has one.
    SPEC_FIELD: ClassVar[OptionField | None] = None

    CATCHES_ALL: ClassVar[bool] = False  # a spec no other kind names is this kind's (a Kubernetes context)

    def __init__(self, spec: str):
        self.spec = spec

    @classmethod
    @abstractmethod
    def names(cls, spec: str) -> bool:
        """Whether `spec` names a target of this kind."""

    @classmethod
    def parse(cls, spec: str) -> Target:
        """The target `spec` names, its form checked (not yet against the system: see `checked`)."""
        return cls(spec)

    @classmethod
    def discover(cls) -> list[Choice]:
        """The targets of this kind this machine can use now (asks the system: not on the UI thread)."""
        return []

    @classmethod
    def holding(cls, model: Model) -> Target | None:
        """The target of this kind that keeps the model's files, if one does."""
        return None

    @classmethod
    def spec_of(cls, choice: Choice, field_value: str) -> str:
        """The spec of a target chosen in a dialog, with what was typed in its SPEC_FIELD."""
        return choice.spec

    @classmethod
    def choice_of(cls, spec: str) -> tuple[str, str]:
        """The other way: the Choice's spec a spec is listed under, and its SPEC_FIELD's value."""
        return spec, ""

    @classmethod
    def option_placeholder(cls, option: OptionField) -> str:
        """What an empty option's field shows: the default it takes."""
        return option.placeholder

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and (self.KIND, self.spec) == (other.KIND, other.spec)

    def __hash__(self) -> int:
        return hash((self.KIND, self.spec))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    @property
    @abstractmethod
    def label(self) -> str:
        """Where it is, in a sentence: "this machine", "the cluster emu/ml", "the SLURM partition gpu"."""

    @property
    def is_here(self) -> bool:
        return False

    def gpus_here(self, gpus: str | None) -> frozenset[int]:
        """The GPUs of this machine that work placed with `gpus` (as its row keeps them) was given: none
        where a target counts GPUs on machines of its own."""
        if self.GPUS != "here" or not gpus or gpus in ("cpu", "auto"):
            return frozenset()
        return frozenset(int(part) for part in gpus.split(",") if part.strip().isdigit())

    # -- options and plans: EngineError says what to change ------------------------------------------

    def checked(self) -> Target:
        """This target as the system it names knows it (a context in the kubeconfig, with its namespace; a
        partition SLURM has); refuses one that is not there."""
        return self

    def options(self, values: dict[str, str], what: str) -> dict[str, Any]:
        """The target's options for a deploy or a fine-tune (`what`), from typed text, checked; an option of
        another kind of target is refused."""
        return check_option_names(self, values, what)

    @abstractmethod
    def plan_finetune(self, session, base: Model, gpus: str, options: dict[str, Any],
                      offline: bool = False) -> Placement:
        """Where a fine-tune of `base` would run, checked; `offline` (a dry run) asks the system nothing."""

    def check_dataset(self, placement: Placement, dataset: Dataset) -> None:
        """Refuse a dataset this target cannot take to its run."""

    @abstractmethod
    def finetune_meta(self, placement: Placement, name: str) -> dict[str, Any]:
        """What the adapter keeps of where its run is (joined to its meta)."""

    @abstractmethod
    def plan_deploy(self, session, model: Model, base: Model | None, settings: DeploySettings,
                    kept_ports: set[int], available_gpus: list[Gpu] | None,
                    adapters: list[tuple[str, Model]] = ()) -> Serving:
        """How `model` would be served here, checked (`kept_ports`: those live deployments keep). `adapters`:
        each adapter served on the base beside it, under its name (a deployed adapter is one of them)."""

    def recheck_deploy(self, session, model: Model) -> None:
        """Under the write lock, before the deployment is registered: what may have changed since the plan."""

    # -- the work: in the supervising job's own process ---------------------------------------------------

    @abstractmethod
    def run_finetune(self, ctx: JobContext) -> None:
        """Run (or follow) the fine-tune until it succeeds; raise JobFailure or JobCancelled otherwise."""

    @abstractmethod
    def serve(self, ctx: JobContext, deployment: Deployment, model: Model, base: Model | None,
              adapters: list[tuple[str, Model]]) -> None:
        """Serve until stopped or failed (both end by an exception); clean up whatever ends it."""

    def adapter_path(self, deployment: Deployment | None, adapter: Model) -> str:
        """Where a deployment's server (None: one being planned) reads an adapter it serves: its files here, which
        a batch job's node reads through the shared filesystem. EngineError where the server cannot read them."""
        from engine import targets

        home = targets.home_of(adapter)
        if not adapter.path or not home.files_here(adapter):
            raise EngineError(f"{adapter.name}'s files are on {home.label}: a server {self.label} runs cannot read "
                              "them")
        return adapter.path

    def job_env(self, job: Job) -> dict[str, str]:
        """What the supervising job's process must see in its environment."""
        return {}

    # -- reconciling: a supervisor that is gone ------------------------------------------------------

    def reattaches(self, job: Job) -> bool:
        """Whether a new supervisor can take over the job's work (its state is on the target, not in the
        lost process): whoever reconciles then starts one instead of failing the job."""
        return False

    def orphaned(self, job: Job) -> str:
        """What to add to the reason of a job whose supervisor died (what stays where)."""
        return ""

    def abandon(self, job: Job) -> None:
        """A job settled without its supervisor (stopped, or failed): end what it had running there."""

    # -- what screens show -----------------------------------------------------------------------------

    def serving_command(self, deployment: Deployment, model: Model | None, base: Model | None,
                        adapters: list[tuple[str, Model]] = ()) -> str:
        """The details' Command line: what runs, and how to see it."""
        return "—"

    def connect_fields(self, deployment: Deployment) -> list[tuple[str, str, str]]:
        """Connect's extra lines: (label, value, hint)."""
        return []

    def listening(self, deployment: Deployment) -> tuple[str, bool]:
        """Where its server listens ("0.0.0.0:8001"), and whether that is beyond this machine."""
        from engine.backends import LOOPBACK

        settings = deployment.loads(deployment.settings_json, {})
        host = settings.get("host") or "127.0.0.1"
        return f"{f'[{host}]' if ':' in host else host}:{settings.get('port', '?')}", host not in LOOPBACK

    def laptop_tunnel(self, deployment: Deployment) -> tuple[str, str] | None:
        """The `ssh -L` command that makes the deployment reachable from the user's laptop, and the URL it is
        reached at there; None when it needs none (or this session did not come over SSH)."""
        from engine.connect import ssh_tunnel

        command = ssh_tunnel(deployment.endpoint or "")
        return (command, deployment.endpoint) if command else None

    def dry_run_finetune(self, name: str, placement: Placement, base: Model, dataset_path, hyperparameters: dict,
                         options: dict) -> tuple[str, str]:
        """What a fine-tune would apply or submit there, as text for stdout, and a note for stderr."""
        raise EngineError(f"--dry-run prints what a target would run: give --target {spec_syntax()}")

    def dry_run_deploy(self, name: str, model: Model, base: Model | None, settings: DeploySettings,
                       adapters: list[tuple[str, Model]] = ()) -> tuple[str, str]:
        raise EngineError(f"--dry-run prints what a target would run: give --target {spec_syntax()}")

    # -- models whose files are there ---------------------------------------------------------------------

    def location(self, model: Model) -> str | None:
        """Where the model's files are, in words."""
        return model.path

    def files_here(self, model: Model) -> bool:
        """Whether this machine can read the model's files (to serve, merge or fine-tune it here)."""
        return self.is_here

    def lives_there(self) -> dict[str, Any]:
        """The meta of a Hub model registered to live on this target (DOWNLOADS): `holding` knows it by it."""
        raise EngineError(f"{self.label} does not download models itself")

    def refuse_here(self, model: Model, doing: str) -> EngineError:
        """Why `doing` ("deploy", "merge", "fine-tune") cannot be done on this machine with this model,
        whose files are on this target."""
        return EngineError(f"{model.name}'s files are on {self.label}: {doing} it there")

    def owns_files(self, model: Model) -> bool:
        """Whether deleting the model frees files of it on the target."""
        return False

    def delete_consequence(self, model: Model) -> str | None:
        """What deleting the model removes there, for the confirmation; None: the files here say it."""
        return None

    def delete_files(self, model: Model) -> None:
        """After its record is gone: remove what the model has on the target."""

    def delete_deployment(self, deployment: Deployment) -> None:
        """After its record is gone: remove what the deployment left on the target."""


# -- the registry -------------------------------------------------------------------------------------


def kinds() -> list[type[Target]]:
    """Every kind of target, in the order the dialogs list them (imported on first use)."""
    from engine.targets.kubernetes import KubernetesTarget
    from engine.targets.local import LocalTarget
    from engine.targets.slurm import SlurmTarget

    return [LocalTarget, KubernetesTarget, SlurmTarget]


def kind(name: str) -> type[Target]:
    return next(k for k in kinds() if k.KIND == name)


def resolve(spec: str | None) -> Target:
    """The target a spec names: "" (this machine), "slurm[:PARTITION]", else a Kubernetes context
    "CONTEXT[/NAMESPACE]". Raises EngineError for one malformed; `checked()` asks the system."""
    spec = (spec or "").strip()
    for target_kind in sorted(kinds(), key=lambda k: k.CATCHES_ALL):
        if target_kind.CATCHES_ALL or target_kind.names(spec):
            return target_kind.parse(spec)
    raise AssertionError("one kind takes every spec the others do not name")


def here() -> Target:
    return resolve("")


def here_choice() -> Choice:
    """This machine, as the dialogs list it."""
    return type(here()).discover()[0]


def choices() -> tuple[list[Choice], list[str]]:
    """The targets this machine can use now (it reads the kubeconfig and asks SLURM: call it off the UI
    thread), and one line for each kind that could not be listed (a broken kubeconfig, SLURM's controller
    down)."""
    found, problems = [], []
    for target_kind in kinds():
        try:
            found += target_kind.discover()
        except EngineError as exc:
            problems.append(f"{target_kind.TITLE} targets: {exc}")
    return found, problems


def home_of(model: Model) -> Target:
    """Where a model's files are: this machine, or the target that made or keeps them."""
    for target_kind in kinds():
        if (found := target_kind.holding(model)) is not None:
            return found
    return here()


def of_job(job: Job) -> Target:
    """Where a job's work runs (a download, an import or a merge runs here)."""
    return resolve(job.params.get("target", ""))


def of_deployment(deployment: Deployment) -> Target:
    return resolve(deployment.loads(deployment.settings_json, {}).get("target", ""))


def spec_syntax() -> str:
    """How the targets other than this machine are typed: "CONTEXT[/NAMESPACE] or slurm[:PARTITION]"."""
    return " or ".join(kind.SYNTAX for kind in kinds() if kind.SYNTAX)


def option_fields() -> list[tuple[OptionField, type[Target]]]:
    """Every option of every kind, for the CLI's flags."""
    return [(option, target_kind) for target_kind in kinds() for option in target_kind.OPTIONS]


def option_label(name: str) -> str:
    """How an option is labelled where it is shown (a deployment's details)."""
    return next((option.label for option, _ in option_fields() if option.name == name), name)


def check_option_names(target: Target, values: dict[str, str], what: str) -> dict[str, Any]:
    """Options named for another kind of target (or another use) are refused, saying whose they are."""
    own = {o.name for o in target.OPTIONS if what in o.uses}
    for name, value in values.items():
        if name in own or value in ("", None):
            continue
        named = sorted(((o, k) for o, k in option_fields() if o.name == name), key=lambda ok: what not in ok[0].uses)
        if not named:
            raise EngineError(f"unknown option {name!r}")
        option, owner = named[0]
        if owner is type(target):
            raise EngineError(f"{option.label}: {option.what} is not used to {what} ({option.flag})")
        raise EngineError(f"{option.label}: {option.what} is for a {owner.TITLE} target (--target)")
    return {name: value for name, value in values.items() if name in own}
