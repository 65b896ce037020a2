"""Download throughput from a loopback Hub: modeldeck's download job vs plain
huggingface_hub.snapshot_download of the same files, in the same run (target ratio ≥ 0.9).
Run: python bench/download_throughput.py

Both fetch the same repo (2 × 256 MiB of weights) into fresh caches, alternately, five times each.
modeldeck's time is the job's own (started → finished, from the database); the plain one is the
snapshot_download call in a fresh process. Both include the Hub's metadata requests.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_home

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.hubserver import HubServer, Repo  # noqa: E402

SIZE = 256 * 1024 * 1024
ROUNDS = 5
PLAIN = """
import sys, time
from huggingface_hub import snapshot_download
start = time.perf_counter()
snapshot_download("bench/model", cache_dir=sys.argv[1], allow_patterns=["*.safetensors", "*.json"])
print(time.perf_counter() - start)
"""


def main() -> None:
    home = fresh_home()
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
             "model-00001-of-00002.safetensors": os.urandom(SIZE), "model-00002-of-00002.safetensors": os.urandom(SIZE)}
    total = sum(len(b) for b in files.values())
    server = HubServer({"bench/model": Repo(files)}).start()
    os.environ["HF_ENDPOINT"] = server.url
    import engine
    from catalog.schema import Job, ModelState
    from engine import jobs, models

    def run_plain() -> None:
        cache = tempfile.mkdtemp(dir=home)
        out = subprocess.run([sys.executable, "-c", PLAIN, cache], capture_output=True, text=True, check=True)
        plain.append(total / float(out.stdout.split()[-1]))

    def run_ours(round_number: int) -> None:
        os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(dir=home)
        os.environ["MODELDECK_HOME"] = str(home / f"home{round_number}")
        db = engine.start()
        model, job = models.pull(db, "bench/model")
        while True:
            jobs.reconcile(db)
            with db.read() as session:
                row = session.get(Job, job.id)
            if row.state.is_terminal():
                break
            time.sleep(0.05)
        assert models.get_model(db, model.name).model.state == ModelState.READY
        ours.append(total / (row.finished_at - row.started_at))

    ours, plain = [], []
    for round_number in range(ROUNDS):  # alternate who goes first, so drift in the machine hits both
        if round_number % 2:
            run_ours(round_number)
            run_plain()
        else:
            run_plain()
            run_ours(round_number)
    server.stop()
    mb = 1024 * 1024
    print(f"plain snapshot_download: {', '.join(f'{r / mb:.0f}' for r in plain)} MiB/s")
    print(f"modeldeck download job: {', '.join(f'{r / mb:.0f}' for r in ours)} MiB/s")
    print(f"throughput ratio modeldeck / plain (medians): {statistics.median(ours) / statistics.median(plain):.2f} "
          f"(target ≥ 0.9)")


if __name__ == "__main__":
    main()
