"""What a batch job asks for (partition, account, QoS, time limit, GPUs, CPUs and memory, extra sbatch
options) and the batch script that asks for it, runs one command on a compute node, and writes its output
into the run's folder in the shared work directory. Pure: `--dry-run` prints what `script` returns."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from engine.targets.slurm.resources import format_time

# Options modeldeck sets itself, or relies on: a user's extra options may not change them (the run would be
# lost, or its API key, which reaches the job in the environment sbatch exports, would not).
OWN_OPTIONS = ("--job-name", "-J", "--output", "-o", "--error", "-e", "--chdir", "-D", "--signal",
               "--open-mode", "--parsable", "--wrap", "--export", "--get-user-env")
SHORT_OWN = tuple(o for o in OWN_OPTIONS if len(o) == 2)  # and their short forms run on: -oFILE, -Jname


@dataclass
class BatchRequest:
    partition: str  # empty: the cluster's default partition
    account: str = ""
    qos: str = ""
    time_s: int | None = None  # None: the partition's default
    gpus: int = 0
    cpus: int = 0  # per task; 0: the cluster's default
    mem_mb: int = 0  # per node; 0: the cluster's default
    extra: list[str] = field(default_factory=list)  # more #SBATCH options, as typed

    def lines(self) -> list[str]:
        """The #SBATCH options, in the order sbatch documents them."""
        options = []
        if self.partition:
            options.append(f"--partition={self.partition}")
        if self.account:
            options.append(f"--account={self.account}")
        if self.qos:
            options.append(f"--qos={self.qos}")
        if self.time_s is not None:
            options.append(f"--time={format_time(self.time_s)}")
        if self.gpus:
            options.append(f"--gres=gpu:{self.gpus}")
        if self.cpus:
            options.append(f"--cpus-per-task={self.cpus}")
        if self.mem_mb:
            options.append(f"--mem={self.mem_mb}M")
        return options + list(self.extra)


def check_extra(text: str) -> list[str]:
    """The user's extra sbatch options, split as a shell would; each must be an option, and none of those
    modeldeck sets itself. Raises ValueError saying which."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"extra sbatch options: {exc}") from None
    options, i = [], 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-"):
            raise ValueError(f"extra sbatch options: {word!r} is not an option (they start with -)")
        name = word.split("=", 1)[0]
        if name in OWN_OPTIONS or (not word.startswith("--") and word[:2] in SHORT_OWN):
            raise ValueError(f"extra sbatch options: modeldeck sets {name if name in OWN_OPTIONS else word[:2]} itself")
        if "=" not in word and name not in FLAGS and i + 1 < len(words) and not words[i + 1].startswith("-"):
            i += 1  # "--constraint a100": the value of the option before
            word = f"{word}={words[i]}" if word.startswith("--") else f"{word} {words[i]}"
        options.append(word)
        i += 1
    return options


# sbatch options that take no value: a word after one of them is an error, not its value.
FLAGS = {"--exclusive", "--requeue", "--no-requeue", "--hold", "--overcommit", "-O", "--contiguous", "--spread-job",
         "--use-min-nodes", "--test-only", "--wait", "-W", "--no-kill", "-k", "--reboot", "--ignore-pbs"}


def script(name: str, request: BatchRequest, run_dir: Path, command: list[str], exports: dict[str, str],
           signal_lead_s: int | None = None, requeue: bool = True) -> str:
    """The batch script: the request's options, the run's output and folder, then the command, which
    replaces the shell (`exec`), so SLURM's signals reach it. `signal_lead_s`: SIGUSR1 this long before the
    time limit (a fine-tune saves a checkpoint on it). Secrets are never in it: they travel in sbatch's
    environment."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}"]
    lines += [f"#SBATCH {option}" for option in request.lines()]
    lines += [f"#SBATCH --output={q(str(run_dir / 'slurm-%j.log'))}", "#SBATCH --open-mode=append",
              f"#SBATCH --chdir={q(str(run_dir))}"]
    if signal_lead_s:
        lines.append(f"#SBATCH --signal=B:USR1@{signal_lead_s}")
    lines.append("#SBATCH --requeue" if requeue else "#SBATCH --no-requeue")
    lines.append("#SBATCH --export=ALL")  # this environment, where the API key and the Hub token travel
    lines.append("")
    lines.append("umask 077  # what the run writes (checkpoints, the adapter, a model's cache) is its owner's alone")
    lines.append('echo "$(date +%H:%M:%S) batch job $SLURM_JOB_ID on $(hostname) (restart ${SLURM_RESTART_COUNT:-0})"')
    lines += [f"export {key}={q(value)}" for key, value in exports.items()]
    lines.append("exec " + " ".join(q(part) for part in command))
    return "\n".join(lines) + "\n"
