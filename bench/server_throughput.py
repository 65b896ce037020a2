"""The built-in server against calling `model.generate` directly, and against `transformers serve
--continuous-batching`, same model, prompt and length, in one run.

1. One client: the built-in server's tokens/s against direct `model.generate` (target: within 5%), and
   its time to first token through a streamed request against direct.
2. 1, 8 and 16 concurrent streaming clients against the built-in server and against
   `transformers serve --continuous-batching` (same KV cache size): total tokens/s and p95 time to first
   token (targets: at 8 and 16 clients at least 0.95 of transformers serve's tokens/s and no worse p95;
   at 16 clients at least 2.5x the built-in server's single-client rate).
Run: python bench/server_throughput.py

The model is a random Llama (hidden 512, 6 layers) with the tests' tokenizer; decoding is greedy and every
reply runs to its full length (the model has no end token). Each server runs as its own process on
127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import fresh_home, percentile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS, ROUNDS, LOADS, LOAD_ROUNDS = 64, 9, (1, 8, 16), 15
KEY = "sk-bench"
PROMPT = [{"role": "user", "content": "Tell me about training and deploying open language models."}]
CACHE_BLOCKS = 36  # what the built-in server sizes for this model on a CPU; transformers serve gets the same


def make_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodel import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1376, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # every reply runs to its length, on both servers
    model.save_pretrained(folder)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(folder)
    return folder


class Running:
    """A server process, up once /health answers."""

    def __init__(self, argv: list[str], env: dict, url: str, model: str):
        import httpx2 as httpx

        self.url, self.model = url, model
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.process.poll() is not None:
                sys.exit(f"{argv[:3]} exited with {self.process.returncode}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # A kept connection is let go before uvicorn's own 5 s keep-alive ends it: one it had just closed, reused
        # while another server's turn ran, came back as a reset (seen once in a run)
        self.client = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                                   limits=httpx.Limits(keepalive_expiry=2.0))

    def body(self, tokens: int) -> dict:
        return {"model": self.model, "messages": PROMPT, "max_tokens": tokens, "temperature": 0}

    def whole(self) -> tuple[float, int]:
        start = time.perf_counter()
        reply = self.client.post(self.url + "/v1/chat/completions", json=self.body(TOKENS)).json()
        return time.perf_counter() - start, reply["usage"]["completion_tokens"]

    def streamed(self, whole: bool = True) -> tuple[float, int, float]:
        """Time to the first token and tokens of a streamed reply, read to its end (closing early would
        make the server stop generating), and when it ended."""
        start, first, tokens = time.perf_counter(), None, 0
        body = self.body(TOKENS) | {"stream": True}
        with self.client.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    tokens += 1  # a chunk per token on both servers (no text is held back: no stop strings)
                    if first is None:
                        first = time.perf_counter() - start
                        if not whole:
                            break
        return first if first is not None else float("nan"), tokens, time.perf_counter()

    def load(self, clients: int) -> tuple[float, float]:
        """Clients streaming at once: total tokens/s, and p95 time to first token."""
        self.streamed()  # warm
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            replies = list(pool.map(lambda _: self.streamed(), range(clients)))
        wall = max(r[2] for r in replies) - start
        return sum(r[1] for r in replies) / wall, percentile([r[0] for r in replies], 0.95)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home = fresh_home()
    folder = make_model(home / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])

    def direct(tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - ids.shape[1] == tokens
        return time.perf_counter() - start

    from engine.jobs import child_env

    port = 18000 + os.getpid() % 1000
    env = child_env() | {"MODELDECK_API_KEY": KEY}
    ours = Running([sys.executable, "-m", "engine.server", "--model", str(folder), "--served-name", "bench",
                    "--port", str(port)], env, f"http://127.0.0.1:{port}", "bench")
    theirs = None
    try:
        ours.whole(), direct(4)  # warm both
        direct_tps, server_tps, direct_ttft, server_ttft = [], [], [], []
        for _ in range(ROUNDS):
            direct_tps.append(TOKENS / direct(TOKENS))
            seconds, count = ours.whole()
            server_tps.append(count / seconds)
            direct_ttft.append(direct(1))
            server_ttft.append(ours.streamed(whole=False)[0])
        theirs = Running([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
                          "--continuous-batching", "--cb-num-blocks", str(CACHE_BLOCKS), "--host", "127.0.0.1",
                          "--port", str(port + 1), "--device", "cpu"], child_env(), f"http://127.0.0.1:{port + 1}",
                         str(folder))
        # Both up at once (an idle server costs next to nothing), measured in turns, so that the machine's
        # drift over the run falls on both alike; medians of the turns.
        our_runs, their_runs = {c: [] for c in LOADS}, {c: [] for c in LOADS}
        for _ in range(LOAD_ROUNDS):
            for clients in LOADS:
                our_runs[clients].append(ours.load(clients))
                their_runs[clients].append(theirs.load(clients))
        median = lambda runs: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))  # noqa: E731
        our_loads = {c: median(r) for c, r in our_runs.items()}
        their_loads = {c: median(r) for c, r in their_runs.items()}
    finally:
        ours.stop()
        if theirs is not None:
            theirs.stop()

    print(f"model: random Llama, hidden 512, 6 layers; {TOKENS} greedy tokens; CPU, {torch.get_num_threads()} threads")
    d_tps, s_tps = statistics.median(direct_tps), statistics.median(server_tps)
    print(f"one client: direct model.generate {d_tps:.1f} tok/s, built-in server {s_tps:.1f} tok/s: ratio "
          f"{s_tps / d_tps:.3f} (target ≥ 0.95); first token direct {statistics.median(direct_ttft) * 1000:.1f} ms, "
          f"streamed {statistics.median(server_ttft) * 1000:.1f} ms")
    print(f"{'clients':>8} {'built-in tok/s':>15} {'p95 TTFT':>9} {'transformers serve tok/s':>25} {'p95 TTFT':>9} "
          f"{'ratio':>6}")
    for clients in LOADS:
        (ours_tps, ours_p95), (their_tps, their_p95) = our_loads[clients], their_loads[clients]
        print(f"{clients:>8} {ours_tps:>15.1f} {ours_p95 * 1000:>7.0f}ms {their_tps:>25.1f} {their_p95 * 1000:>7.0f}ms "
              f"{ours_tps / their_tps:>6.2f}")
    print(f"built-in server, 16 clients against 1: {our_loads[16][0] / our_loads[1][0]:.2f}x (target ≥ 2.5x); "
          f"ratio: built-in / transformers serve (target ≥ 0.95 at 8 and 16); medians of {LOAD_ROUNDS} turns each")


if __name__ == "__main__":
    main()
