"""Adapters on the built-in server, as real server processes: a base and three LoRA adapters built so that each
changes what the model says differently, served side by side and chosen per request; adapters loaded and unloaded
while other requests stream, without a restart; what cannot be served refused in words."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx2 as httpx
import pytest

from tests.test_server import KEY, Server

PROMPT = "modeldeck downloads"
TOKENS = 16
# (rank, layers) per adapter: attention only, every projection, and the MLP only
SHAPES = {"alpha": (4, ("q_proj", "v_proj")),
          "beta": (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
          "gamma": (2, ("gate_proj", "down_proj"))}


def greedy(base, adapter=None, prompt=PROMPT, tokens: int = TOKENS) -> str:
    """What a model says to the prompt, greedy, by PEFT's own forward (the adapter not merged) and model.generate."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]])  # text, or ids
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        out = model.eval().generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).rstrip("\ufffd")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The base (no end-of-sequence token: every reply runs its whole length), its adapters, and what each of
    them says to PROMPT. Each adapter's seed is the first that makes it say something visible of its own (a
    random adapter may say only special tokens, which a reply leaves out)."""
    from tests.tinymodel import make_tiny_adapter, make_tiny_llama

    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_llama(root / "tiny", context=1024, endless=True)
    adapters, said = {}, {"tiny": greedy(base)}
    for name, (rank, targets) in SHAPES.items():
        for seed in range(1, 30):
            folder = make_tiny_adapter(base, root / name, seed=seed, rank=rank, targets=targets)
            text = greedy(base, folder)
            if len(text) >= 8 and text not in said.values():
                adapters[name], said[name] = folder, text
                break
    assert adapters.keys() == SHAPES.keys()
    return base, adapters, said


@pytest.fixture(scope="module")
def expected(made):
    return made[2]


@pytest.fixture(scope="module")
def server(made, tmp_path_factory):
    base, adapters, _ = made
    running = Server(base, tmp_path_factory.mktemp("server"), adapters={"alpha": adapters["alpha"],
                                                                       "beta": adapters["beta"]})
    yield running
    running.stop()


def complete(server, model: str, tokens: int = TOKENS, prompt: str = PROMPT, **extra) -> httpx.Response:
    return server.post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": tokens,
                                           "temperature": 0, **extra})


def text_of(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def choices_by_path(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("modeldeck_choices_total{")}


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, made):
    _, adapters, _ = made
    listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert [(m["id"], m["parent"]) for m in listed] == [("tiny", None), ("alpha", "tiny"), ("beta", "tiny")]
    assert listed[1]["root"] == str(adapters["alpha"])
    one = server.client().models.retrieve("beta")
    assert one.id == "beta" and one.model_extra["parent"] == "tiny"


def test_each_request_gets_the_model_it_names_alone_or_mixed_in_one_batch(server, made, expected):
    """Alone (the plain path) and many at once to different models (one continuous batch, each token with its
    own adapter): token for token what PEFT gives each."""
    for name in ("tiny", "alpha", "beta"):
        assert text_of(complete(server, name)) == expected[name], name
    before = choices_by_path(server).get("batched", 0)
    names = ["tiny", "alpha", "beta"] * 3
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda name: complete(server, name), names))
    assert [text_of(r) for r in replies] == [expected[name] for name in names]
    assert [r.json()["model"] for r in replies] == names
    assert choices_by_path(server).get("batched", 0) - before >= 6, "the mixed requests were batched"
    # longer prompts read in one batch: each prompt's tokens applied as a run of its own adapter
    long_prompt = "modeldeck downloads, fine-tunes and deploys open language models from a terminal."
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda name: complete(server, name, prompt=long_prompt), names[:6]))
    base = made[0]
    assert [text_of(r) for r in replies] == [greedy(base, made[1].get(name), long_prompt) for name in names[:6]]
    # streamed through the SDK, the same
    streamed = "".join(chunk.choices[0].text for chunk in server.client().completions.create(
        model="beta", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True) if chunk.choices)
    assert streamed == expected["beta"]


def test_an_adapter_never_reuses_the_base_models_cached_prompt(made, tmp_path):
    """A prompt longer than two cache blocks being answered by the base in a batch (its blocks are kept, to be
    shared with a request that begins alike), an adapter loaded meanwhile, and the same prompt sent to it: an
    adapter's keys and values differ from the base's for the same tokens, so it must read the prompt itself."""
    from transformers import AutoTokenizer

    base, adapters, _ = made
    tokenizer = AutoTokenizer.from_pretrained(base)
    long_prompt = tokenizer(" ".join(["modeldeck"] * 400))["input_ids"][:600]
    server = Server(base, tmp_path, extra=["--enable-lora"])
    try:
        def reply(model: str, tokens: int = 8) -> str:
            return text_of(server.post("/v1/completions", {"model": model, "prompt": long_prompt, "max_tokens": tokens,
                                                           "temperature": 0}))

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            started = [threading.Event(), threading.Event()]
            base_said = [pool.submit(stream_all, server, "tiny", 420, event, long_prompt) for event in started]
            assert all(event.wait(60) for event in started)  # a batch, answering: its prompt's blocks are kept
            assert server.post("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(adapters["alpha"])}
                               ).status_code == 200
            assert not any(f.done() for f in base_said), "the base requests must still run (their blocks kept)"
            said = reply("alpha")
            [f.result() for f in base_said]
        assert said == greedy(base, adapters["alpha"], long_prompt, 8)
    finally:
        server.stop()


def stream_all(server, model: str, tokens: int, started: threading.Event | None = None,
               prompt: str | list[int] = PROMPT) -> tuple[str, str | None]:
    """A streamed completion read to its end: its text, and its finish reason (None: it broke off)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    texts, finish = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts.append(choice["text"])
                finish = choice["finish_reason"] or finish
                if started is not None and len(texts) == 3:
                    started.set()
    return "".join(texts), finish


def test_adapters_load_and_unload_while_requests_stream_without_a_restart(made, expected, tmp_path):
    base, adapters, _ = made
    server = Server(base, tmp_path, adapters={"alpha": adapters["alpha"]})
    try:
        pid = server.process.pid
        long = 300
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            started = [threading.Event(), threading.Event()]
            streams = [pool.submit(stream_all, server, "tiny", long, started[0]),
                       pool.submit(stream_all, server, "alpha", long, started[1])]
            assert all(event.wait(60) for event in started)
            # load gamma while both stream, and use it at once
            loaded = server.post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(adapters["gamma"])})
            assert loaded.status_code == 200 and "gamma" in loaded.text
            assert text_of(complete(server, "gamma")) == expected["gamma"]
            # unload alpha while its own stream runs: that stream finishes with alpha, new requests get a 404
            unloaded = server.post("/v1/unload_lora_adapter", {"lora_name": "alpha"})
            assert unloaded.status_code == 200
            refused = complete(server, "alpha")
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
            assert "'tiny', 'gamma'" in refused.json()["error"]["message"]
            results = [s.result(timeout=120) for s in streams]
        assert all(finish == "length" for _, finish in results), results
        # greedy, whole, what PEFT gives: alpha's stream went on with alpha after it was unloaded
        assert results == [(greedy(base, tokens=long), "length"),
                           (greedy(base, adapters["alpha"], tokens=long), "length")]
        # alpha again under another name: its weights were read anew, and answer as before
        again = server.post("/v1/load_lora_adapter", {"lora_name": "alpha-2", "lora_path": str(adapters["alpha"])})
        assert again.status_code == 200 and text_of(complete(server, "alpha-2")) == expected["alpha"]
        assert server.process.pid == pid and server.process.poll() is None
        log = server.log.read_text()
        assert "adapter 'gamma' loaded" in log and "adapter 'alpha' unloaded" in log
    finally:
        server.stop()


def test_what_cannot_be_served_is_refused_in_words_and_nothing_changes(made, tmp_path, server):
    from tests.tinymodel import make_tiny_adapter, make_tiny_llama

    base, adapters, _ = made
    other_base = make_tiny_llama(tmp_path / "other", seed=3)
    # a model of another shape: same layer names, other sizes
    import json as json_

    config = json_.loads((other_base / "config.json").read_text())
    config.update(hidden_size=48, intermediate_size=96)
    from transformers import LlamaConfig, LlamaForCausalLM

    kept = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    LlamaForCausalLM(LlamaConfig(**kept)).save_pretrained(tmp_path / "wider")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(other_base).save_pretrained(tmp_path / "wider")
    foreign = make_tiny_adapter(tmp_path / "wider", tmp_path / "foreign", seed=5)
    dora = make_tiny_adapter(base, tmp_path / "dora", seed=6, use_dora=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")

    def load(name: str, path, key: str = KEY) -> httpx.Response:
        return server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, key=key)

    cases = [
        (load("foreign", foreign), 400, "does not fit this model"),
        (load("dora", dora), 400, "uses DoRA"),
        (load("nothing", tmp_path / "absent"), 400, "no adapter_config.json"),
        (load("broken", broken), 400, "cannot be read"),
        (load("alpha", adapters["gamma"]), 400, "has already been loaded"),
        (load("tiny", adapters["gamma"]), 400, "the base model's name"),
        (load("bad name!", adapters["gamma"]), 400, "lora_name"),
        (load("gamma", adapters["gamma"], key="sk-wrong"), 401, "invalid API key"),
        (server.post("/v1/unload_lora_adapter", {"lora_name": "never"}), 404, "cannot be found"),
        (server.post("/v1/load_lora_adapter", {"lora_name": "x"}), 400, "lora_path"),
    ]
    for reply, status, words in cases:
        assert reply.status_code == status and words in reply.json()["error"]["message"], reply.text
    listed = [m.id for m in server.client().models.list()]
    assert listed == ["tiny", "alpha", "beta"]


def test_a_rank_over_the_servers_maximum_is_refused_and_bad_adapters_at_start_stop_it(made, tmp_path):
    import subprocess
    import sys

    from engine.jobs import child_env
    from tests.test_server import free_port

    base, adapters, _ = made
    server = Server(base, tmp_path, extra=["--enable-lora", "--max-lora-rank", "4"])
    try:
        assert server.post("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(adapters["alpha"])}
                           ).status_code == 200
        over = server.post("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": str(adapters["beta"])})
        assert over.status_code == 400 and "rank 8 is over this deployment's maximum LoRA rank of 4" in over.text
    finally:
        server.stop()
    # without --enable-lora (nor an adapter at start) a server takes none
    plain = Server(base, tmp_path)
    try:
        refused = plain.post("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": str(adapters["alpha"])})
        assert refused.status_code == 400 and "--enable-lora" in refused.text
    finally:
        plain.stop()
    out = subprocess.run([sys.executable, "-m", "engine.server", "--model", str(base), "--served-name", "tiny",
                          "--port", str(free_port()), "--adapter", f"x={tmp_path / 'absent'}"],
                         env=child_env() | {"MODELDECK_API_KEY": KEY}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "adapter 'x':" in out.stderr and "no adapter_config.json" in out.stderr


async def test_an_unloaded_adapters_weights_go_once_no_request_uses_it(made):
    """Unloading frees the adapter's weights at the next forward, whatever that forward is for (here the base
    model's), once no request still uses it."""
    import asyncio

    from engine.server.api import Sampling
    from engine.server.generation import Engine
    from transformers import AutoTokenizer

    base, adapters, _ = made
    ids = AutoTokenizer.from_pretrained(base)(PROMPT)["input_ids"]
    engine = Engine(str(base), "auto", None, log=lambda line: None, lora=True)

    async def finished(adapter=None):
        choice = engine.submit(ids, Sampling(max_tokens=4, temperature=0), adapter=adapter)
        while not choice.ended:
            await asyncio.sleep(0.02)

    try:
        alpha = await asyncio.to_thread(engine.load_adapter, "alpha", str(adapters["alpha"]))
        await finished(alpha)
        assert list(engine._stack.adapters.values()) == [alpha]
        engine.unload_adapter("alpha")
        await finished()  # a base request: the stack is made anew without it
        assert engine._stack.adapters == {} and engine.adapters == {}
    finally:
        engine.shutdown()
