"""The machine's GPUs, asked of `nvidia-smi` (never of torch: the dashboard must stay light)."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mb: int
    memory_used_mb: int

    @property
    def memory_free_mb(self) -> int:
        return self.memory_total_mb - self.memory_used_mb

    def describe(self) -> str:
        return f"GPU {self.index}: {self.name}, {self.memory_free_mb / 1024:.0f} of {self.memory_total_mb / 1024:.0f} GiB free"


def list_gpus() -> list[Gpu]:
    """The CUDA GPUs with their memory now; empty where there is no NVIDIA driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(float(parts[2])), int(float(parts[3]))))
        except (IndexError, ValueError):
            continue
    return gpus


@functools.cache
def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def choices(gpus: list[Gpu]) -> list[tuple[str, str]]:
    """The GPU choices a dialog offers, as (label, value as parse_choice takes it)."""
    if not gpus:
        return [("auto: CPU (no NVIDIA GPU here)", "auto"), ("CPU", "cpu")]
    return [("auto: the first GPU", "auto"), *((gpu.describe(), str(gpu.index)) for gpu in gpus),
            ("all GPUs", ",".join(str(g.index) for g in gpus)), ("CPU", "cpu")]


def cuda_env(gpus: str) -> dict[str, str]:
    """The environment that shows a process only the chosen GPUs ("cpu": none), numbered as nvidia-smi
    numbers them (CUDA's own default order is fastest first)."""
    return {"CUDA_VISIBLE_DEVICES": "" if gpus == "cpu" else gpus, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def parse_choice(choice: str, available: list[Gpu]) -> str:
    """A GPU choice as the user types it ("auto", "cpu", "0", "0,1") checked against what is here;
    returns the normalized choice ("cpu" or a comma list of indexes). "auto" is the first GPU, else cpu."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return str(available[0].index) if available else "cpu"
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
