"""Kinds and states, with no database import: cheap enough for the dashboard's first paint."""

from enum import StrEnum


class ModelKind(StrEnum):
    BASE = "base"
    MERGED = "merged"
    ADAPTER = "adapter"


class ModelState(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


# Pending while its files are made (downloaded, converted, trained, merged); a failed one is retried; a
# Ready one whose files live on a target only is Pending again while they are downloaded here.
MODEL_TRANSITIONS: dict[ModelState, set[ModelState]] = {
    ModelState.PENDING: {ModelState.READY, ModelState.FAILED},
    ModelState.READY: {ModelState.PENDING},
    ModelState.FAILED: {ModelState.PENDING},
}


class JobKind(StrEnum):
    DOWNLOAD = "download"
    IMPORT = "import"
    FINETUNE = "finetune"
    MERGE = "merge"
    SERVE = "serve"
    EVALUATE = "evaluate"  # scores a Ready model on a dataset; the model stays Ready


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# A terminal state is never left (see engine.jobs.transition).
JOB_TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


class DeploymentState(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"

    def is_live(self) -> bool:
        """Served now, or about to be: it holds its name, its port and its GPUs."""
        return self in LIVE_DEPLOYMENT_STATES


LIVE_DEPLOYMENT_STATES = (DeploymentState.PENDING, DeploymentState.READY)

# A deployment moves through its phases while Pending; a Ready one is Pending again while its server comes
# back elsewhere (a batch job requeued); Failed and Stopped are never left (it is deployed anew).
DEPLOYMENT_TRANSITIONS: dict[DeploymentState, set[DeploymentState]] = {
    DeploymentState.PENDING: {DeploymentState.PENDING, DeploymentState.READY, DeploymentState.FAILED,
                              DeploymentState.STOPPED},
    DeploymentState.READY: {DeploymentState.READY, DeploymentState.PENDING, DeploymentState.FAILED,
                            DeploymentState.STOPPED},
    DeploymentState.FAILED: set(),
    DeploymentState.STOPPED: set(),
}
