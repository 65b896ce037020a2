"""A batch job's state as modeldeck's lifecycle: PENDING with SLURM's reason in words, RUNNING, and each
way a job ends (COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, …) with what
it means for the user. Pure: it reads what squeue and sacct print."""

from __future__ import annotations

from dataclasses import dataclass

# squeue's long state names, by what they mean here.
WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED",
           "RESIZING", "SIGNALING", "STAGE_OUT", "POWER_UP_NODE"}
RUNNING = {"RUNNING", "COMPLETING"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE", "REVOKED", "SPECIAL_EXIT"}

# Why a job waits (squeue's %r), in words. Reasons not listed are shown as SLURM spells them.
REASONS = {
    "Priority": "queued behind higher priority jobs",
    "Dependency": "waiting for the jobs it depends on",
    "BeginTime": "waiting for its start time",
    "JobHeldUser": "held: scontrol release lets it run",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "the nodes it needs are not available (down, drained or reserved)",
    "PartitionDown": "its partition is down",
    "PartitionInactive": "its partition is inactive",
    "PartitionNodeLimit": "it asks for more nodes than its partition allows",
    "PartitionTimeLimit": "its time limit is over its partition's maximum",
    "Reservation": "waiting for its reservation",
    "NodeDown": "a node it needs is down",
    "BadConstraints": "no node has what it asks for (its constraints cannot be met)",
    "Licenses": "waiting for licenses",
    "launch failed requeued held": "its launch failed; SLURM held it (scontrol release to try again)",
    "None": "being scheduled",
    "": "being scheduled",
}


def pending_words(reason: str, wants_gpus: bool) -> str:
    """Why a PENDING job waits, in words a user acts on."""
    reason = (reason or "").strip().strip("()")
    if reason == "Resources":
        return "waiting for GPUs" if wants_gpus else "waiting for CPUs or memory"
    if reason.startswith(("QOS", "AssocGrp", "AssocMax")):
        return f"held by a QoS or account limit ({reason})"
    key, _, rest = reason.partition(",")  # "ReqNodeNotAvail, UnavailableNodes:vm[01-02]"
    if key in REASONS:
        return REASONS[key] + (f" ({rest.strip()})" if rest.strip() else "")
    return f"waiting ({reason})"


@dataclass
class Ending:
    """How an ended batch job reads: whether it was a success, and the reason when it was not."""

    succeeded: bool
    reason: str | None = None
    cancelled: bool = False  # scancel (by modeldeck when asked, else from outside)


def exit_code(text: str | None) -> tuple[int | None, int | None]:
    """("code", "signal") from sacct's "3:0" or squeue's raw wait status ("768")."""
    if not text or text in ("N/A", "(null)"):
        return None, None
    if ":" in text:
        code, _, signal = text.partition(":")
        return int(code or 0), int(signal or 0)
    status = int(text)
    return status >> 8, status & 0x7F


def ending(state: str, code: str | None, time_limit: str | None = None, memory: str | None = None) -> Ending:
    """What a job's final state means. `time_limit` and `memory` are what it asked for, to say which limit
    it reached."""
    state = state.split()[0] if state else ""
    number, signal = exit_code(code)
    if state == "COMPLETED":
        return Ending(True)
    if state == "CANCELLED":  # modeldeck's own cancels end its supervisor first: this one came from outside
        return Ending(False, "its batch job was cancelled outside modeldeck (scancel)", cancelled=True)
    if state == "TIMEOUT":
        return Ending(False, "its batch job reached its time limit" + (f" of {time_limit}" if time_limit else ""))
    if state == "OUT_OF_MEMORY":
        return Ending(False, "its batch job ran out of memory" + (f" (--mem {memory})" if memory else "")
                      + ": ask for more memory")
    if state == "NODE_FAIL":
        return Ending(False, "its node failed while it ran")
    if state == "PREEMPTED":
        return Ending(False, "its batch job was preempted by a higher priority job")
    if state == "BOOT_FAIL":
        return Ending(False, "its node failed to boot")
    if state == "DEADLINE":
        return Ending(False, "its batch job missed its deadline")
    if state == "FAILED":
        if signal:
            return Ending(False, f"its batch job was killed by signal {signal}")
        return Ending(False, f"its batch job exited with code {number}" if number is not None else "its batch job failed")
    return Ending(False, f"its batch job ended {state.lower() or 'without a state'}")
