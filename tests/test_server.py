"""The built-in OpenAI-compatible server, as a real process on 127.0.0.1 serving a tiny model, driven by
the official `openai` SDK and by plain HTTP."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # what the openai SDK itself uses
import pytest

KEY = "sk-test-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, tmp_path: Path, adapters: dict[str, Path] | None = None, name: str = "tiny",
                 extra: list[str] | None = None):
        self.port, self.name = free_port(), name
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"server-{self.port}.log"
        args = [sys.executable, "-m", "engine.server", "--model", str(model), "--served-name", name,
                "--port", str(self.port), *(extra or [])]
        for adapter_name, folder in (adapters or {}).items():
            args += ["--adapter", f"{adapter_name}={folder}"]
        from engine.jobs import child_env

        env = child_env() | {"MODELDECK_API_KEY": KEY}
        self.process = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the server did not come up:\n" + self.log.read_text())

    def client(self, key: str = KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, path: str, body: dict, key: str = KEY) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.tinymodel import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    running = Server(model_dir, tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


def chat(server, **extra):
    return server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is the capital of France?"}], **extra)


def test_chat_completion_with_the_openai_sdk(server):
    reply = chat(server, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 1 <= reply.usage.completion_tokens <= 8
    again = chat(server, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content  # greedy is deterministic


def test_streamed_chat_with_the_openai_sdk_matches_the_whole_reply(server):
    whole = chat(server, max_tokens=12, temperature=0.8, seed=7).choices[0].message.content
    chunks = list(chat(server, max_tokens=12, temperature=0.8, seed=7, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert chunks[-1].usage.completion_tokens >= 1  # the usage chunk comes last
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_stop_sequences_and_text_completions(server):
    reply = server.client().completions.create(model="tiny", prompt="modeldeck", max_tokens=20, temperature=0)
    assert reply.object == "text_completion" and reply.usage.completion_tokens >= 1
    text = reply.choices[0].text
    if len(text) > 3:  # stop at the text's third character: the reply ends before it
        cut = server.client().completions.create(model="tiny", prompt="modeldeck", max_tokens=20, temperature=0,
                                                 stop=[text[2:4]])
        assert cut.choices[0].text == text[: text.find(text[2:4])] and cut.choices[0].finish_reason == "stop"


def test_the_api_key_is_required_on_every_v1_route(server):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError) as caught:
        server.client(key="wrong").models.list()
    assert caught.value.status_code == 401
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert [m.id for m in server.client().models.list()] == ["tiny"]


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "other", "messages": USER}, 404, "model", "The model 'other' does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages", "at least 1 item"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages", "valid array"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "must be one of"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "messages[0].content[0].text", "valid string"),
    ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature", "valid number"),
    ({"model": "tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "tiny", "messages": USER, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": "tiny", "messages": USER, "seed": 1.5}, 400, "seed", "valid integer"),
    ({"model": "tiny", "messages": USER, "seed": 2**70}, 400, "seed", "less than or equal to"),
    ({"model": "tiny", "messages": USER, "logit_bias": {"99999": 5}}, 400, "logit_bias", "no token id"),
    ({"model": "tiny", "messages": USER, "frobnicate": 1}, 400, "frobnicate", "Unrecognized request argument"),
    ({"model": "tiny", "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "chat template offers no tools"),
    ({"model": "tiny", "messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "needs 'logprobs'"),
    ({"model": "tiny", "messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "only for streamed"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 300}]}, 400, "messages", "context is 128"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w" * 5000}]}, 400, "messages",
     "more than this model's context"),
])
def test_bad_requests_get_an_openai_shaped_error_naming_the_parameter(server, body, status, param, message):
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"]


def test_several_clients_at_once_are_all_answered(server):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda seed: chat(server, max_tokens=6, seed=seed, stream=seed % 2 == 0
                                                  ), range(4)))
    streamed = ["".join(c.choices[0].delta.content or "" for c in r if c.choices) for r in replies[0::2]]
    whole = [r.choices[0].message.content for r in replies[1::2]]
    assert len(streamed) == 2 and len(whole) == 2 and all(isinstance(t, str) for t in streamed + whole)


def test_metrics_count_requests_and_tokens(server):
    chat(server, max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values['modeldeck_requests_total{status="200"}'] >= 1
    assert values["modeldeck_generation_tokens_total"] >= 1 and values["modeldeck_time_to_first_token_seconds_count"] >= 1
    assert values["modeldeck_tokens_per_second"] > 0


def test_sigterm_shuts_the_server_down_cleanly_and_frees_the_port(model_dir, tmp_path):
    server = Server(model_dir, tmp_path)
    # uvicorn shuts down gracefully, then ends by the signal it caught, as a process should
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log.read_text()
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.port))  # free again


def test_without_an_api_key_the_server_refuses_to_start(model_dir):
    from engine.jobs import child_env

    env = {k: v for k, v in child_env().items() if k != "MODELDECK_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "engine.server", "--model", str(model_dir), "--served-name", "x",
                          "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "set MODELDECK_API_KEY" in out.stderr
    assert not os.environ.get("MODELDECK_API_KEY")


def test_no_part_of_a_stop_string_is_ever_sent():
    from engine.server.generation import held_back

    assert held_back("Hello Us", ["User:"]) == 2  # "Us" may become "User:"
    assert held_back("Hello U", ["User:", "\n\n"]) == 1
    assert held_back("Hello\n", ["User:", "\n\n"]) == 1
    assert held_back("Hello", ["User:"]) == 0 and held_back("Hello", []) == 0


def test_a_short_request_is_not_stuck_behind_long_ones(server):
    """Generations interleave a token at a time: a 2-token reply asked for while three long ones stream
    ends before any of them (one at a time, in order, it would wait for all three)."""
    import threading

    client, started, ends = server.client(), threading.Barrier(4), []

    def long_reply() -> None:
        chunks = iter(client.completions.create(model="tiny", prompt="a b c d e f", max_tokens=100, temperature=0,
                                                stream=True))
        next(chunks)
        started.wait(timeout=30)
        tokens = 1 + sum(1 for c in chunks if c.choices and c.choices[0].text)
        ends.append((time.monotonic(), tokens))

    threads = [threading.Thread(target=long_reply) for _ in range(3)]
    for thread in threads:
        thread.start()
    started.wait(timeout=30)  # all three are generating
    short = client.completions.create(model="tiny", prompt="a b c d e f", max_tokens=2, temperature=0)
    short_done = time.monotonic()
    for thread in threads:
        thread.join(timeout=60)
    assert short.usage.completion_tokens == 2 and len(ends) == 3
    assert all(tokens > 50 for _, tokens in ends)  # (greedy on this prompt runs the whole length)
    assert short_done < min(end for end, _ in ends)
