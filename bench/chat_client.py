"""The chat client and the chat pane, measured (run by hand: python bench/chat_client.py).

1. modeldeck's chat client (engine.chat.stream_chat) against a plain async httpx streaming request to the
   same deployment (the built-in server, a random Llama, hidden 512, 6 layers), same prompt and length,
   greedy, alternating rounds, medians: time to first token and tokens/s (target: overhead under 5%).
2. The chat pane under a synthetic stream of 2,000 tokens/s (a local server sending fixed tokens): every
   token rendered, and a key typed into the prompt while it streams answered within 100 ms (p95, max).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from common import fresh_home, percentile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY, ROUNDS, TOKENS = "sk-bench", 15, 96
SYNTH_TOKENS, SYNTH_RATE = 4000, 2000  # the pane's test: 2 s of 2,000 tokens/s


def random_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tinymodel import make_tokenizer

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None  # replies run to their max tokens: both sides get the same length
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1024, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


async def plain_stream(client, url: str, body: dict) -> tuple[float, float, int]:
    """The baseline: a bare streaming request, parsing just enough SSE to see the content."""
    start, first, last, count = time.perf_counter(), None, None, 0
    async with client.stream("POST", url + "/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
                count += 1
    return first - start, (count - 1) / (last - first), count


async def client_stream(client, target, messages, params) -> tuple[float, float, int]:
    from engine.chat import Delta, Done, stream_chat

    start, first, last, count = time.perf_counter(), None, None, 0
    async for event in stream_chat(client, target, messages, params):
        if isinstance(event, Delta):
            last = time.perf_counter()
            first = first or last
            count += 1
        elif isinstance(event, Done):
            pass
    return first - start, (count - 1) / (last - first), count


async def compare_clients(url: str) -> None:
    import httpx2 as httpx

    from engine.chat import ChatParams, Target, new_client

    messages = [{"role": "user", "content": "Tell me about deploying open language models."}]
    params = ChatParams(temperature=0, top_p=1.0, max_tokens=TOKENS)
    body = {"model": "bench", "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            **params.as_dict()}
    target = Target(url, KEY, "bench")
    plain, ours = [], []
    async with httpx.AsyncClient(timeout=120) as bare, new_client() as kept:
        await plain_stream(bare, url, body), await client_stream(kept, target, messages, params)  # warm both
        for _ in range(ROUNDS):
            plain.append(await plain_stream(bare, url, body))
            ours.append(await client_stream(kept, target, messages, params))
    assert {r[2] for r in plain} == {r[2] for r in ours}, "both sides must receive the same number of chunks"
    ttft_p, ttft_o = statistics.median(r[0] for r in plain), statistics.median(r[0] for r in ours)
    rate_p, rate_o = statistics.median(r[1] for r in plain), statistics.median(r[1] for r in ours)
    print(f"1. chat client vs plain httpx, {TOKENS} greedy tokens, {ROUNDS} alternating rounds (medians):")
    print(f"   time to first token: plain {ttft_p * 1000:.1f} ms, modeldeck {ttft_o * 1000:.1f} ms "
          f"→ overhead {(ttft_o / ttft_p - 1) * 100:+.1f}% (target under 5%)")
    print(f"   tokens/s:            plain {rate_p:.1f}, modeldeck {rate_o:.1f} → ratio {rate_o / rate_p:.3f}")


class Synthetic(BaseHTTPRequestHandler):
    """An OpenAI-compatible stream of SYNTH_TOKENS fixed tokens at SYNTH_RATE tokens/s."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send_json({"object": "list", "data": [{"id": "synthetic", "object": "model"}]})

    def _send_json(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        batch, start = 20, time.perf_counter()
        for i in range(0, SYNTH_TOKENS, batch):
            lines = []
            for n in range(i, i + batch):
                delta = {"content": f"t{n} " + ("\n\n" if n % 100 == 99 else "")}
                lines.append("data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
            self.wfile.write(("\n\n".join(lines) + "\n\n").encode())
            self.wfile.flush()
            pause = start + (i + batch) / SYNTH_RATE - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
               "usage": {"completion_tokens": SYNTH_TOKENS}}
        self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())


def expected_text() -> str:
    return "".join(f"t{n} " + ("\n\n" if n % 100 == 99 else "") for n in range(SYNTH_TOKENS))


async def pane_under_load(url: str) -> None:
    import engine
    from engine import endpoints
    from tui.app import ModelDeckApp
    from tui.screens.chat import ChatScreen, ReplyView

    db = engine.start()
    dep = await asyncio.to_thread(endpoints.add, db, "synthetic", url)  # (it asks the endpoint, synchronously)
    app = ModelDeckApp(db, open_chat="synthetic")
    async with app.run_test(size=(120, 40)) as pilot:
        while not isinstance(app.screen, ChatScreen) or app.screen.target is None:
            await pilot.pause(0.05)
        chat = app.screen
        prompt = chat.query_one("#prompt")
        prompt.value = "go"
        handled: list[float] = []
        chat.watch(prompt, "value", lambda _value: handled.append(time.perf_counter()), init=False)
        start = time.perf_counter()
        await pilot.press("enter")
        while not chat.streaming:
            await asyncio.sleep(0.001)
        handled.clear()
        loop, sent, done = asyncio.get_running_loop(), [], threading.Event()

        def typist() -> None:
            """Keys arrive from outside the app's loop every 50 ms, as a terminal's would."""
            while not done.wait(0.05):
                sent.append(time.perf_counter())
                loop.call_soon_threadsafe(app.post_message, _key("x"))

        threading.Thread(target=typist, daemon=True).start()
        while chat.streaming:
            await asyncio.sleep(0.01)
        done.set()
        await pilot.pause(0.3)
        latencies = [h - s for s, h in zip(sent, handled)]
        elapsed = time.perf_counter() - start
        await pilot.pause(0.2)
        shown = chat.query(ReplyView).last().query_one("Markdown").source
        stats = chat.turns[-1].stats
    print(f"2. the chat pane under a synthetic stream of {SYNTH_TOKENS:,} tokens at {SYNTH_RATE:,} tokens/s:")
    print(f"   reply done in {elapsed:.2f} s (the stream alone takes {SYNTH_TOKENS / SYNTH_RATE:.2f} s); "
          f"all tokens rendered: {shown == expected_text()} ({stats.tokens:,} counted)")
    print(f"   keys typed every 50 ms while it streams: each reached the prompt in p50 "
          f"{percentile(latencies, 0.5) * 1000:.1f} ms, p95 {percentile(latencies, 0.95) * 1000:.1f} ms, max "
          f"{max(latencies) * 1000:.1f} ms over {len(latencies)} keys (target under 100 ms); "
          f"{len(sent) - len(handled)} unanswered")
    assert dep


def _key(char: str):
    from textual import events

    return events.Key(char, char)


def main() -> None:
    fresh_home()
    import httpx2 as httpx

    from engine.jobs import child_env

    folder = random_llama(Path(os.environ["MODELDECK_HOME"]).parent / "model")
    port = 18500 + os.getpid() % 400
    server = subprocess.Popen([sys.executable, "-m", "engine.server", "--model", str(folder), "--served-name", "bench",
                               "--port", str(port)], env=child_env() | {"MODELDECK_API_KEY": KEY},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    synthetic = ThreadingHTTPServer(("127.0.0.1", 0), Synthetic)
    threading.Thread(target=synthetic.serve_forever, daemon=True).start()
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        asyncio.run(compare_clients(f"http://127.0.0.1:{port}/v1"))
        asyncio.run(pane_under_load(f"http://127.0.0.1:{synthetic.server_address[1]}/v1"))
    finally:
        server.terminate()
        server.wait(timeout=20)
        synthetic.shutdown()


if __name__ == "__main__":
    main()
