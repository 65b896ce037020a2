"""On the compute node: pick a free port, tell it in the run's folder, then become the server.

`python -m engine.targets.slurm.launch ENDPOINT_FILE KEY_VARIABLE -- COMMAND…` replaces `{port}` in COMMAND
with a port free on this node, writes ENDPOINT_FILE ({"host", "port", "job_id", "restart"}: how the login
node reaches the server) and execs COMMAND, so SLURM's signals reach the server itself. The host is the
node's name as SLURM knows it, which the cluster's other hosts resolve. It refuses to start a server whose
API key (in KEY_VARIABLE) did not reach the job: that server would answer anyone."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> None:
    endpoint_file, key_variable, _, command = argv[0], argv[1], argv[2], argv[3:]
    if not os.environ.get(key_variable):
        sys.exit(f"{key_variable} is not in this batch job's environment: not starting a server without its API key "
                 "(did an sbatch option or SBATCH_EXPORT keep the environment from the job?)")
    port = free_port()
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    told = {"host": host, "port": port, "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
    tmp = Path(endpoint_file + ".tmp")
    tmp.write_text(json.dumps(told), encoding="utf-8")
    os.replace(tmp, endpoint_file)
    print(f"serving on {host}:{port} (GPUs {os.environ.get('CUDA_VISIBLE_DEVICES') or 'none'})", flush=True)
    argv = [part.replace("{port}", str(port)) for part in command]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
