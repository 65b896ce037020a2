"""The built-in server against calling `model.generate` directly, same model, prompt and length, in one run
(targets: tokens/s ratio ≥ 0.9; time to first token through a streamed request within 20 ms of direct).
Then 8 concurrent streaming clients: total tokens/s and p95 time to first token.
Run: python bench/server_throughput.py

The model is a random Llama (hidden 512, 6 layers) with the tests' tokenizer; decoding is greedy and both
sides produce the same number of tokens. The server runs as its own process on 127.0.0.1.
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

TOKENS, ROUNDS, CLIENTS = 64, 5, 8
KEY = "sk-bench"
PROMPT = [{"role": "user", "content": "Tell me about training and deploying open language models."}]


def make_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodel import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1376, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    import httpx2 as httpx
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

    port = 18000 + os.getpid() % 1000
    from engine.jobs import child_env

    server = subprocess.Popen([sys.executable, "-m", "engine.server", "--model", str(folder), "--served-name", "bench",
                               "--port", str(port)], env=child_env() | {"MODELDECK_API_KEY": KEY},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "bench", "messages": PROMPT, "max_tokens": TOKENS, "temperature": 0}
        # One client, as the openai SDK keeps one: a new httpx client per call costs ~20 ms of its own
        # (measured here: a GET /health took 23 ms with a new client each time; a whole 1-token chat
        # request on a kept client took 26 ms, of which the server's own first token was 24 ms).
        client = httpx.Client(headers=headers, timeout=120)

        def served() -> tuple[float, int]:
            start = time.perf_counter()
            reply = client.post(url + "/v1/chat/completions", json=body).json()
            return time.perf_counter() - start, reply["usage"]["completion_tokens"]

        def streamed(whole: bool = False) -> tuple[float, int]:
            """Time to the first token of a streamed reply; with `whole`, read it to the end and count its
            tokens (closing the stream early would make the server stop generating for it)."""
            start, first, tokens = time.perf_counter(), None, 0
            options = {"stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", url + "/v1/chat/completions", json=body | options) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                        first = time.perf_counter() - start
                        if not whole:
                            break
            if first is None:
                raise AssertionError("no token came")
            return first, tokens

        def first_token() -> float:
            return streamed()[0]

        direct(4), served()  # warm both
        direct_tps, server_tps, direct_ttft, server_ttft = [], [], [], []
        for _ in range(ROUNDS):
            direct_tps.append(TOKENS / direct(TOKENS))
            seconds, count = served()
            if count != TOKENS:
                sys.exit(f"the server stopped at {count} tokens (the model emitted its end token); rerun")
            server_tps.append(count / seconds)
            direct_ttft.append(direct(1))
            server_ttft.append(first_token())

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:  # each client reads its whole reply
            replies = list(pool.map(lambda _: streamed(whole=True), range(CLIENTS)))
        wall = time.perf_counter() - start
        ttfts, total_tokens = [r[0] for r in replies], sum(r[1] for r in replies)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"model: random Llama, hidden 512, 6 layers; {TOKENS} greedy tokens; CPU, {torch.get_num_threads()} threads")
    print(f"direct model.generate: median {statistics.median(direct_tps):.1f} tok/s, "
          f"first token {statistics.median(direct_ttft) * 1000:.1f} ms")
    print(f"built-in server:       median {statistics.median(server_tps):.1f} tok/s, "
          f"first token (streamed) {statistics.median(server_ttft) * 1000:.1f} ms")
    print(f"tokens/s ratio server / direct: {statistics.median(server_tps) / statistics.median(direct_tps):.3f} "
          f"(target ≥ 0.9); first-token overhead "
          f"{(statistics.median(server_ttft) - statistics.median(direct_ttft)) * 1000:.1f} ms (target < 20 ms)")
    print(f"{CLIENTS} concurrent streaming clients, each reading its whole reply: {total_tokens} tokens in {wall:.2f} s = "
          f"{total_tokens / wall:.1f} tok/s in total; time to first token p50 {percentile(ttfts, 0.5) * 1000:.0f} ms, "
          f"p95 {percentile(ttfts, 0.95) * 1000:.0f} ms (interleaved a token at a time, up to 8 at once)")
    last = [line for line in metrics.splitlines() if line.startswith("modeldeck_tokens_per_second")]
    print(f"server's own gauge: {last[0] if last else 'missing'}")


if __name__ == "__main__":
    main()
