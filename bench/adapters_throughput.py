"""Adapters on the built-in server, measured side by side in one run.

1. Throughput: a server with four adapters loaded and requests spread over them, against a server with one
   adapter getting the same requests (target: at least 0.9 of its total tokens/s), at 8 and 16 concurrent
   streaming clients; and, for what serving adapters unmerged costs at all, the base model's requests on the
   same server. Both servers run at once and are measured in turns (medians), so the machine's drift falls on
   both alike.
2. Hot-loading: loading an adapter onto a Ready deployment (`serve_adapter`) against deploying that adapter
   anew until it is Ready, through modeldeck's engine with real supervising jobs (expected far below 1).
Run: python bench/adapters_throughput.py

The model is a random Llama (hidden 512, 6 layers: bench/server_throughput.py's) and each adapter a random
rank-16 LoRA on every attention and MLP projection (what a modeldeck fine-tune trains by default); decoding is
greedy and every reply runs its full length.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import fresh_home, percentile
from server_throughput import KEY, PROMPT, Running, make_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS, LOADS, ROUNDS, DEPLOY_ROUNDS = 64, (8, 16), 9, 3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def streamed(server: Running, model: str) -> tuple[float, int, float]:
    """A streamed chat read to its end: time to first token, tokens (as the server counts them: a random
    adapter's tokens are often special or half a character, which send no text), when it ended."""
    start, first, tokens = time.perf_counter(), None, 0
    body = {"model": model, "messages": PROMPT, "max_tokens": TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with server.client.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first if first is not None else time.perf_counter() - start
    assert tokens == TOKENS, tokens  # every reply runs its whole length
    return first if first is not None else float("nan"), tokens, time.perf_counter()


def load(server: Running, models: list[str]) -> tuple[float, float]:
    """One client per model name, all at once: total tokens/s and p95 time to first token."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(lambda model: streamed(server, model), models))
    return sum(r[1] for r in replies) / (max(r[2] for r in replies) - start), percentile([r[0] for r in replies], 0.95)


def throughput(home: Path, folder: Path, adapters: list[Path]) -> None:
    from engine.jobs import child_env

    port = 19000 + os.getpid() % 1000
    env = child_env() | {"MODELDECK_API_KEY": KEY}

    def server(port: int, count: int) -> Running:
        argv = [sys.executable, "-m", "engine.server", "--model", str(folder), "--served-name", "base",
                "--port", str(port)]
        for i, adapter in enumerate(adapters[:count]):
            argv += ["--adapter", f"a{i}={adapter}"]
        return Running(argv, env, f"http://127.0.0.1:{port}", "base")

    one, four = server(port, 1), server(port + 1, 4)
    runs: dict[tuple, list] = {}
    try:
        for running in (one, four):
            load(running, ["a0"] * 4)  # warm
        for _ in range(ROUNDS):
            for clients in LOADS:
                cases = {("one", clients): (one, ["a0"] * clients),
                         ("four", clients): (four, [f"a{i % 4}" for i in range(clients)]),
                         ("base", clients): (four, ["base"] * clients)}
                for key, (running, models) in cases.items():
                    runs.setdefault(key, []).append(load(running, models))
    finally:
        one.stop()
        four.stop()
    median = {key: (statistics.median(r[0] for r in found), statistics.median(r[1] for r in found))
              for key, found in runs.items()}
    print(f"{'clients':>8} {'1 adapter tok/s':>16} {'4 adapters tok/s':>17} {'ratio':>6} {'p95 TTFT 1 / 4':>16} "
          f"{'base tok/s':>11} {'1 adapter / base':>17}")
    for clients in LOADS:
        (o_tps, o_p95), (f_tps, f_p95), (b_tps, _) = (median[(k, clients)] for k in ("one", "four", "base"))
        print(f"{clients:>8} {o_tps:>16.1f} {f_tps:>17.1f} {f_tps / o_tps:>6.3f} {o_p95 * 1000:>7.0f} /{f_p95 * 1000:>5.0f}ms "
              f"{b_tps:>11.1f} {o_tps / b_tps:>17.3f}")
    print(f"ratio: four adapters spread / one adapter, same requests (target ≥ 0.9); medians of {ROUNDS} turns")


def hot_load(home: Path, folder: Path, adapters: list[Path]) -> None:
    """serve_adapter onto a Ready deployment against a deployment of the adapter from nothing to Ready."""
    import engine
    from catalog.schema import Deployment, DeploymentState, Model, ModelKind, ModelState
    from engine import deployments, jobs, models
    from engine.backends import DeploySettings
    from engine.deployment_adapters import serve_adapter, unserve_adapter

    db = engine.start()
    base = models.import_path(db, folder, "base")[0]
    with db.write() as session:
        for i, adapter in enumerate(adapters):
            session.add(Model(name=f"lora-{i}", kind=ModelKind.ADAPTER, state=ModelState.READY, source="finetune:base",
                              base_id=base.id, path=str(adapter), size_bytes=1))

    def until_ready(deployment_id: int) -> None:
        while True:
            jobs.reconcile(db)
            with db.read() as session:
                state = session.get(Deployment, deployment_id).state
            if state != DeploymentState.PENDING:
                assert state == DeploymentState.READY, state
                return
            time.sleep(0.05)

    serving, _ = deployments.deploy(db, "base", DeploySettings(backend="transformers"))
    until_ready(serving.id)
    hot, anew = [], []
    try:
        for i in range(DEPLOY_ROUNDS):
            start = time.perf_counter()
            serve_adapter(db, f"lora-{i}", "base")
            hot.append(time.perf_counter() - start)
            unserve_adapter(db, f"lora-{i}", "base")
            start = time.perf_counter()
            fresh, _ = deployments.deploy(db, f"lora-{i}", DeploySettings(backend="transformers"), name=f"fresh-{i}")
            until_ready(fresh.id)
            anew.append(time.perf_counter() - start)
            deployments.stop(db, fresh.id)
    finally:
        deployments.stop(db, serving.id)
    h, a = statistics.median(hot), statistics.median(anew)
    print(f"an adapter onto a Ready deployment: hot-loaded {h * 1000:.0f} ms; deployed anew to Ready {a:.2f} s; "
          f"ratio {h / a:.4f} (medians of {DEPLOY_ROUNDS}; hot: {', '.join(f'{t * 1000:.0f}' for t in hot)} ms; "
          f"anew: {', '.join(f'{t:.2f}' for t in anew)} s)")


def main() -> None:
    import torch

    from tests.tinymodel import make_tiny_adapter

    home = fresh_home()
    folder = make_model(home / "model")
    adapters = [make_tiny_adapter(folder, home / f"lora-{i}", seed=i, rank=16, targets=TARGETS) for i in range(4)]
    print(f"model: random Llama, hidden 512, 6 layers; adapters: rank 16 on {', '.join(TARGETS)}; {TOKENS} greedy "
          f"tokens; CPU, {torch.get_num_threads()} threads")
    throughput(home, folder, adapters)
    hot_load(home, folder, adapters[:DEPLOY_ROUNDS])


if __name__ == "__main__":
    main()
