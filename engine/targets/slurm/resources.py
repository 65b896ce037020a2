"""SLURM's own spellings of what a job asks for: time limits ("2:00:00", "1-12", "90"), memory ("16G",
"4000" in MB) and generic resources ("gpu:a100:4(S:0-1)"), parsed as sbatch reads them and written back
in the same spellings. Pure functions: the plan checks a request with them before anything is sent."""

from __future__ import annotations

import re

UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)
MEMORY_UNITS_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


def parse_time(text: str) -> int | None:
    """A time limit in seconds, in any form sbatch's --time takes: minutes, minutes:seconds,
    hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds. None means no
    limit (UNLIMITED); a malformed one raises ValueError naming the forms."""
    text = text.strip()
    if text.upper() in UNLIMITED:
        return None
    match = _TIME.match(text)
    if not match:
        raise ValueError(f"time limit {text!r}: use minutes (90), hours:minutes:seconds (2:00:00) or "
                         "days-hours:minutes:seconds (1-12:00:00)")
    days, first, second, third = match.groups()
    numbers = [int(n) for n in (first, second, third) if n is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(numbers) == 1:  # minutes
        return numbers[0] * 60
    if len(numbers) == 2:  # minutes:seconds
        return numbers[0] * 60 + numbers[1]
    hours, minutes, seconds = numbers
    return (hours * 60 + minutes) * 60 + seconds


def format_time(seconds: int | None) -> str:
    """As SLURM writes a time: [days-]hours:minutes:seconds, or UNLIMITED."""
    if seconds is None:
        return "UNLIMITED"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}-" if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def parse_memory_mb(text: str) -> int:
    """Memory as sbatch's --mem takes it (a number of MB, or with a K, M, G or T suffix), in MB."""
    match = _MEMORY.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"memory {text!r}: a size like 16G or 4000M (a plain number is MB)")
    return max(1, round(float(match.group(1)) * MEMORY_UNITS_MB[match.group(2).upper()]))


def gres_gpus(gres: str) -> int:
    """How many GPUs a node's (or a job's) generic resources hold: "gpu:2", "gpu:a100:4(S:0-1)",
    "gpu:a100:2,gpu:v100:1,mps:100" (the last counts 3); none for "(null)"."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres or ""):
        parts = item.split("(", 1)[0].split(":")
        if parts[0] in ("gpu", "gres/gpu") and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
        elif parts[0] in ("gpu", "gres/gpu") and len(parts) == 1:
            total += 1
    return total
