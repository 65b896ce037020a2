"""On a machine with NVIDIA GPUs: what NVML reads, what one reading costs, what auto would choose, and the
`gpu`-marked tests of the ledger and placement (tests/test_gpus.py, the CLI's `gpus`), printed to quote.

Run: python bench/gpu_check.py [--reads 200] [--no-tests]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import fresh_home

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=200, help="NVML readings to time (and a tenth as many ledgers)")
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args()
    fresh_home()
    import engine
    from engine.format import gpu_usage, held_by
    from engine.gpus import choose, list_gpus, read_ledger

    began = time.perf_counter()
    gpus = list_gpus()  # opens NVML and reads the topology once
    opened = time.perf_counter() - began
    if not gpus:
        print("NVML finds no GPU here: nothing to check (the ledger is hidden, auto is the CPU)")
        return 1
    began = time.perf_counter()
    for _ in range(args.reads):
        list_gpus()
    per_read = (time.perf_counter() - began) / args.reads
    db = engine.start()
    ledgers = max(args.reads // 10, 1)
    began = time.perf_counter()
    for _ in range(ledgers):
        states = read_ledger(db)
    per_ledger = (time.perf_counter() - began) / ledgers
    print(f"{len(gpus)} GPU(s); NVML opened in {1000 * opened:.1f} ms; a reading {1000 * per_read:.2f} ms; "
          f"the ledger (reading + database + process table) {1000 * per_ledger:.2f} ms, "
          f"{100 * per_ledger / 2:.3f}% of a core at one every 2 s")
    for state in states:
        g = state.gpu
        print(f"  GPU {g.index} {g.name}: {' '.join(gpu_usage(g))}; NVLink {sorted(g.nvlink) or 'none'}; "
              f"{len(g.processes)} process(es); held by: {held_by(state)}")
    for count in range(1, len(gpus) + 1):
        try:
            print(f"  auto for {count} GPU(s), 1 GiB: {choose(states, count, 2**30).why}")
        except ValueError as exc:
            print(f"  auto for {count} GPU(s): {exc}")
    print(json.dumps([asdict(s.gpu) | {"nvlink": sorted(s.gpu.nvlink)} for s in states], default=str)[:2000])
    if args.no_tests:
        return 0
    tests = ["tests/test_gpus.py", "tests/test_cli.py::test_gpus_says_there_is_none_here_and_prints_an_empty_json_list"]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests],
                          cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
