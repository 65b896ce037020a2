"""Following a job's log file as it grows, for `modeldeck logs -f` and the dashboard's log view."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def follow(path: str | Path, stop: Callable[[], bool], interval: float = 0.25) -> Iterator[list[str]]:
    """Yield the file's lines in batches as they are written, until `stop()` says so (checked between
    reads; the rest of the file is yielded after it). Progress bars redraw a line with carriage
    returns: only each line's last state is kept."""
    offset, pending, path = 0, "", Path(path)
    while True:
        stopping = stop()
        try:
            with path.open("r", encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except FileNotFoundError:
            chunk = ""
        lines = (pending + chunk).split("\n")
        pending = lines.pop()
        if stopping and pending:
            lines.append(pending)
        if lines:
            yield [line.rsplit("\r", 1)[-1] for line in lines]
        if stopping:
            return
        time.sleep(interval)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")
# A line that says something went wrong (not a progress bar or a "ready at" that happened to come last).
_TROUBLE = re.compile(r"error|fail|fatal|cannot|can't|could not|couldn't|refused|denied|no such|not found|"
                      r"killed|out of memory|oom|abort|panic|invalid|unable|exceed|too (large|long|many|big)|"
                      r"segmentation|core dumped|traceback", re.IGNORECASE)


def tail_reason(lines: list[str]) -> str:
    """What a log's last lines say went wrong, in one line: a traceback's final exception line when there
    is one (not the code around it), else the last line that reports trouble; '' when none does (quoting
    whatever came last would be quoting something else)."""
    kept = [line.rsplit("\r", 1)[-1].strip() for line in lines]
    kept = [line for line in kept if line]
    for line in reversed(kept):
        if _EXCEPTION_LINE.match(line):
            return line[:400]
    for line in reversed(kept):
        if _TROUBLE.search(line):
            return line[:400]
    return ""
