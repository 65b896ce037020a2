"""The chat client, conversations, the connection kit and external endpoints, against the real built-in
server (a tiny model the tests build) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from engine import conversations, deployments, endpoints
from engine.chat import ChatError, ChatParams, Delta, Done, Target, new_client, stream_chat
from engine.connect import snippets, ssh_tunnel
from engine.errors import EngineError
from tests.test_server import KEY, Server


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory):
    from tests.tinymodel import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("endless") / "tiny", context=4096, endless=True)


@pytest.fixture(scope="module")
def server(endless_dir, tmp_path_factory):
    running = Server(endless_dir, tmp_path_factory.mktemp("chat-server"))
    yield running
    running.stop()


def target(server, key: str = KEY) -> Target:
    return Target(server.url + "/v1", key, "tiny")


async def collect(target: Target, params: ChatParams, messages=None) -> tuple[list[str], Done]:
    deltas, done = [], None
    async with new_client() as client:
        async for event in stream_chat(client, target, messages or [{"role": "user", "content": "hi"}], params):
            if isinstance(event, Delta):
                deltas.append(event.text)
            else:
                done = event
    return deltas, done


def test_a_streamed_reply_comes_in_pieces_with_its_numbers(server):
    deltas, done = asyncio.run(collect(target(server), ChatParams(temperature=0, max_tokens=40)))
    whole = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=40, temperature=0).choices[0].message.content
    assert "".join(deltas) == whole and len(deltas) > 5
    stats = done.stats
    assert stats.tokens == 40 and stats.finish == "length" and 0 < stats.ttft_s < stats.elapsed_s
    assert stats.tokens_per_s > 0 and "40 tokens" in stats.describe() and "cut at max tokens" in stats.describe()


@pytest.mark.parametrize(("key", "params", "message"), [
    ("sk-wrong", ChatParams(), "the server refused the API key (401)"),
    (KEY, ChatParams(temperature=5.0), "the server refused the request (400): 'temperature': Input should be"),
])
def test_a_refused_request_is_one_line(server, key, params, message):
    with pytest.raises(ChatError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        asyncio.run(collect(target(server, key), params))
    assert "\n" not in str(caught.value)


def test_a_server_that_is_not_there_is_one_line():
    from engine.backends import free_port

    with pytest.raises(ChatError, match=r"cannot reach http://127.0.0.1:\d+/v1: is the server running\?"):
        asyncio.run(collect(Target(f"http://127.0.0.1:{free_port()}/v1", KEY, "tiny"), ChatParams()))


def test_a_server_killed_mid_reply_gives_one_line_and_keeps_what_came(endless_dir, tmp_path):
    running = Server(endless_dir, tmp_path)
    received = []

    async def chat():
        async with new_client() as client:
            async for event in stream_chat(client, target(running), [{"role": "user", "content": "hi"}],
                                           ChatParams(max_tokens=4000)):
                if isinstance(event, Delta):
                    received.append(event.text)
                    if len(received) == 20:
                        running.process.send_signal(signal.SIGKILL)

    try:
        with pytest.raises(ChatError, match="^the server closed the connection mid-reply$"):
            asyncio.run(chat())
    finally:
        running.process.kill()
        running.process.wait()
    assert len(received) >= 20


def test_stopping_a_reply_closes_the_stream_and_the_server_stops_generating(server):
    async def chat():
        async with new_client() as client:
            stream = stream_chat(client, target(server), [{"role": "user", "content": "hi"}],
                                 ChatParams(max_tokens=4000))
            async for event in stream:
                if isinstance(event, Delta):
                    break
            await stream.aclose()  # what cancelling the pane's worker does

    before = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code
    asyncio.run(chat())
    # the server is free again at once: a 1-token request is answered quickly, not after 4,000 tokens
    reply = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert before == reply.status_code == 200 and reply.elapsed.total_seconds() < 2


def test_chat_params_from_typed_text():
    params, errors = ChatParams.from_strings({"temperature": "0.2", "top_p": "", "max_tokens": "64"})
    assert (params.temperature, params.top_p, params.max_tokens, errors) == (0.2, 1.0, 64, {})
    _, errors = ChatParams.from_strings({"temperature": "hot", "top_p": "2", "max_tokens": "1.5"})
    assert errors == {"temperature": "Temperature: 'hot' is not a number", "top_p": "Top-p must be from 0 to 1",
                      "max_tokens": "Max tokens: '1.5' is not a whole number"}


def test_conversations_are_kept_per_deployment_and_go_with_it(db):
    from catalog.schema import Deployment, DeploymentState

    with db.write() as session:
        dep = Deployment(name="d", backend="transformers", state=DeploymentState.STOPPED)
        session.add(dep)
        session.flush()
        dep_id = dep.id
    first = conversations.create(db, dep_id, "Be brief.", ChatParams(temperature=0.1))
    conversations.add(db, first.id, conversations.Turn("user", "What is LoRA, in one line please?"))
    reply = conversations.add(db, first.id, conversations.Turn("assistant", "A low-rank adapter.",
                                                               Done().stats))
    second = conversations.create(db, dep_id, "", ChatParams())
    listed = conversations.listed(db, dep_id)
    assert [c.id for c in listed] == [second.id, first.id]  # latest first
    assert listed[1].title == "What is LoRA, in one line please?"
    turns = conversations.turns(db, first.id)
    assert [(t.role, t.content) for t in turns] == [("user", "What is LoRA, in one line please?"),
                                                    ("assistant", "A low-rank adapter.")]
    assert conversations.request_messages("Be brief.", turns)[0] == {"role": "system", "content": "Be brief."}
    conversations.remove(db, reply.id)
    assert len(conversations.turns(db, first.id)) == 1
    assert conversations.settings(listed[1]) == ("Be brief.", ChatParams(temperature=0.1))
    deployments.delete(db, dep_id)
    assert conversations.listed(db, dep_id) == [] and conversations.turns(db, first.id) == []


def test_the_connect_snippets_work_when_run(server, tmp_path):
    """Exactly as shown: each snippet pasted into a shell (or a .py file) gets a reply."""
    kit = {s.title: s.text for s in snippets(server.url + "/v1", "tiny", KEY)}
    curl = subprocess.run(["bash", "-c", kit["curl"]], capture_output=True, text=True, timeout=60)
    assert curl.returncode == 0 and '"object":"chat.completion"' in curl.stdout.replace(" ", ""), curl.stdout
    script = tmp_path / "snippet.py"
    script.write_text(kit["Python (openai SDK)"])
    python = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert python.returncode == 0, python.stderr
    env = subprocess.run(["bash", "-c", kit["Environment variables"] + "\n" + f"{sys.executable} -c 'from openai "
                          "import OpenAI; import os; print(OpenAI().models.list().data[0].id)'"],
                         capture_output=True, text=True, timeout=60)
    assert env.returncode == 0 and env.stdout.strip() == "tiny", env.stderr


def test_ssh_tunnel_only_for_a_loopback_endpoint_over_ssh():
    over_ssh = {"SSH_CONNECTION": "10.0.0.5 51234 10.0.0.9 22"}
    tunnel = ssh_tunnel("http://127.0.0.1:8001/v1", over_ssh)
    assert tunnel.startswith("ssh -N -L 8001:127.0.0.1:8001 ") and tunnel.endswith("@10.0.0.9")
    assert ssh_tunnel("http://127.0.0.1:8001/v1", {}) is None  # not over SSH: the URL works as it is
    assert ssh_tunnel("http://10.0.0.9:8001/v1", over_ssh) is None  # already reachable


def test_an_external_endpoint_is_listed_and_its_key_stays_out_of_the_database(db, server, monkeypatch):
    monkeypatch.setenv("TEAM_LLM_KEY", KEY)
    with pytest.raises(EngineError, match=r"\$NOPE_KEY is not set"):
        endpoints.add(db, "team", server.url + "/v1", key_env="NOPE_KEY")
    with pytest.raises(EngineError, match=r"wants an API key: name the environment variable that holds it"):
        endpoints.add(db, "team", server.url + "/v1", key=None)
    monkeypatch.setenv("WRONG_KEY", "sk-wrong")
    with pytest.raises(EngineError, match=r"refused the API key \(401\)"):
        endpoints.add(db, "team", server.url + "/v1", key_env="WRONG_KEY")
    with pytest.raises(EngineError, match="does not serve 'gpt-4'; it serves: tiny"):
        endpoints.add(db, "team", server.url + "/v1", model="gpt-4", key_env="TEAM_LLM_KEY")
    with pytest.raises(EngineError, match="is not an http"):
        endpoints.add(db, "team", "ftp://x", key_env="TEAM_LLM_KEY")
    dep = endpoints.add(db, "team", server.url + "/v1/", key_env="TEAM_LLM_KEY")
    assert (dep.backend, dep.state.value, dep.served_name, dep.endpoint) == ("external", "ready", "tiny", server.url + "/v1")
    assert KEY not in db.path.read_bytes().decode("latin-1") and dep.api_key is None
    assert endpoints.api_key(dep) == KEY
    deltas, done = asyncio.run(collect(Target(dep.endpoint, endpoints.api_key(dep), dep.served_name),
                                       ChatParams(max_tokens=3)))
    assert done.stats.tokens == 3
    with pytest.raises(EngineError, match="nothing to stop"):
        deployments.stop(db, "team")
    monkeypatch.delenv("TEAM_LLM_KEY")
    with pytest.raises(EngineError, match=r"read from \$TEAM_LLM_KEY, which is not set"):
        endpoints.api_key(dep)
    deployments.delete(db, "team")
    assert deployments.deployment_rows(db) == []


def test_an_external_key_can_live_in_the_system_keyring(db, server):
    keyring = pytest.importorskip("keyring", reason="the optional keyring package is not installed")
    from keyring.backend import KeyringBackend

    class Memory(KeyringBackend):  # a real keyring backend, kept in memory (this machine has no keyring)
        priority = 1
        secrets: dict = {}

        def get_password(self, service, username):
            return self.secrets.get((service, username))

        def set_password(self, service, username, password):
            self.secrets[(service, username)] = password

        def delete_password(self, service, username):
            self.secrets.pop((service, username), None)

    before = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        dep = endpoints.add(db, "kept", server.url + "/v1", key=KEY)
        assert Memory.secrets == {("modeldeck", "kept"): KEY} and endpoints.api_key(dep) == KEY
        assert KEY not in db.path.read_bytes().decode("latin-1")
        deployments.delete(db, "kept")
        assert Memory.secrets == {}
    finally:
        keyring.set_keyring(before)


def test_without_a_usable_keyring_the_message_says_what_to_do(db, server):
    pytest.importorskip("keyring", reason="the optional keyring package is not installed")
    import keyring
    from keyring.backends import fail

    before = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        with pytest.raises(EngineError, match="no usable system keyring here .*environment variable"):
            endpoints.add(db, "kept", server.url + "/v1", key=KEY)
    finally:
        keyring.set_keyring(before)
    assert deployments.deployment_rows(db) == [] and os.environ.get("MODELDECK_HOME")


def test_a_server_that_never_answers_times_out_in_one_line():
    import socket

    silent = socket.socket()  # accepts the connection, then says nothing
    silent.bind(("127.0.0.1", 0))
    silent.listen()

    async def chat():
        async with new_client(read_timeout=0.5) as client:
            async for _ in stream_chat(client, Target(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", KEY, "m"),
                                       [{"role": "user", "content": "hi"}], ChatParams()):
                pass

    try:
        with pytest.raises(ChatError, match=r"^no answer from the server in time \(connect 5 s, between chunks 0.5 s\)$"):
            asyncio.run(chat())
    finally:
        silent.close()


def test_snippets_quote_what_a_shell_would_break_on_and_the_tunnel_knows_the_ssh_port():
    kit = {s.title: s.text for s in snippets("https://llm.example.com/openai/v1?tenant=a&x=1", "m", "sk-1")}
    assert kit["curl"].startswith("curl -sS 'https://llm.example.com/openai/v1?tenant=a&x=1/chat/completions' \\")
    tunnel = ssh_tunnel("http://[::1]:8001/v1", {"SSH_CONNECTION": "10.0.0.5 51234 10.0.0.9 2222"})
    assert tunnel.startswith("ssh -N -p 2222 -L 8001:[::1]:8001 ")


def test_a_key_with_a_stray_line_break_is_cleaned_and_never_shown(db, server, monkeypatch):
    monkeypatch.setenv("CRLF_KEY", KEY + "\r\n")  # a key read from a file with Windows line endings
    dep = endpoints.add(db, "crlf", server.url + "/v1", key_env="CRLF_KEY")
    assert endpoints.api_key(dep) == KEY
    monkeypatch.setenv("CRLF_KEY", KEY[:5] + "\x1b" + KEY[5:])
    with pytest.raises(EngineError, match=r"the API key in \$CRLF_KEY has control characters") as caught:
        endpoints.api_key(dep)
    assert KEY[5:] not in str(caught.value)
