"""Serving backends: the exact vLLM and built-in commands for a set of drawer settings, ports, and the
memory fit check. vLLM itself needs a CUDA GPU: its real launch is marked `gpu` and skips without one."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.backends import (
    DeploySettings,
    builtin_command,
    choose_backend,
    estimate_memory,
    fit_verdict,
    free_port,
    port_free,
    vllm_available,
    vllm_command,
)


def test_auto_picks_vllm_only_with_a_gpu_and_vllm():
    assert choose_backend("auto", on_gpu=True, has_vllm=True) == "vllm"
    assert choose_backend("auto", on_gpu=True, has_vllm=False) == "transformers"
    assert choose_backend("auto", on_gpu=False, has_vllm=True) == "transformers"
    assert choose_backend("transformers", on_gpu=True, has_vllm=True) == "transformers"


def test_the_vllm_command_carries_the_drawer_settings_and_keeps_the_key_out_of_argv():
    settings = DeploySettings(tensor_parallel=2, dtype="bfloat16", max_model_len=8192, gpu_memory_fraction=0.85,
                              port=8123)
    command = vllm_command("/models/qwen", settings, "qwen", "sk-secret", gpus="0,1")
    assert command.argv == ["vllm", "serve", "/models/qwen", "--host", "127.0.0.1", "--port", "8123",
                            "--served-model-name", "qwen", "--tensor-parallel-size", "2", "--dtype", "bfloat16",
                            "--gpu-memory-utilization", "0.85", "--max-model-len", "8192", "--disable-uvicorn-access-log"]
    assert command.env == {"VLLM_API_KEY": "sk-secret", "CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert "sk-secret" not in command.shown


def test_adapters_are_served_by_vllm_on_their_base_each_under_its_own_name(tmp_path):
    folders = {}
    for name, rank in (("support-lora", 24), ("sql-lora", 8)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "adapter_config.json").write_text(json.dumps({"r": rank}))
    command = vllm_command("/models/base", DeploySettings(port=9000), "base", "k", gpus="2",
                           adapters=[(name, str(folder)) for name, folder in folders.items()])
    argv = command.argv
    assert argv[argv.index("--served-model-name") + 1] == "base"
    modules = argv.index("--lora-modules")
    assert argv[modules + 1:modules + 3] == [f"support-lora={folders['support-lora']}", f"sql-lora={folders['sql-lora']}"]
    assert "--enable-lora" in argv and argv[argv.index("--max-lora-rank") + 1] == "32"  # rank 24, rounded up
    assert argv[argv.index("--max-loras") + 1] == "4"  # adapters in one batch
    assert command.env["CUDA_VISIBLE_DEVICES"] == "2" and command.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # a max rank asked for, no adapter yet: adapters can be loaded while it serves
    later = vllm_command("/models/base", DeploySettings(port=9000, max_lora_rank=20), "base", "k", gpus="2").argv
    assert "--enable-lora" in later and later[later.index("--max-lora-rank") + 1] == "32" and "--lora-modules" not in later
    # neither: vLLM without LoRA (its kernels cost throughput)
    plain = vllm_command("/models/base", DeploySettings(port=9000), "base", "k", gpus="2")
    assert "--enable-lora" not in plain.argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env


def test_the_builtin_command_serves_the_base_with_its_adapters(tmp_path):
    command = builtin_command("/models/base", DeploySettings(port=9001, max_model_len=512, max_lora_rank=16), "base",
                              "k", gpus="cpu", adapters=[("tuned", "/models/tuned"), ("other", "/models/other")])
    argv = command.argv
    assert argv[1:3] == ["-m", "engine.server"] and "--enable-lora" in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--adapter"] == ["tuned=/models/tuned", "other=/models/other"]
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
    assert argv[argv.index("--port") + 1] == "9001" and argv[argv.index("--max-model-len") + 1] == "512"
    assert command.env["MODELDECK_API_KEY"] == "k" and command.env["CUDA_VISIBLE_DEVICES"] == ""


def test_settings_are_checked_and_a_non_loopback_bind_is_flagged():
    assert DeploySettings().problems() == {} and not DeploySettings().exposed
    bad = DeploySettings(backend="tgi", tensor_parallel=0, dtype="int3", gpu_memory_fraction=1.5, port=70000)
    assert set(bad.problems()) == {"backend", "tensor_parallel", "dtype", "gpu_memory_fraction", "port"}
    assert DeploySettings(host="0.0.0.0").exposed


def test_a_port_in_use_is_seen_and_a_free_one_is_found():
    port = free_port()
    assert port_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_free("127.0.0.1", port)


def test_the_fit_check_counts_weights_and_kv_cache(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "torch_dtype": "bfloat16", "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "hidden_size": 896, "max_position_embeddings": 32768}))  # Qwen2.5-0.5B's shape
    estimate = estimate_memory(str(tmp_path), size_on_disk=988_097_824, dtype="auto", max_len=4096)
    assert estimate.weights == 988_097_824
    assert estimate.kv_cache == 2 * 24 * 2 * 64 * 4096 * 2  # 48 MiB for one 4k-token sequence
    assert estimate_memory(str(tmp_path), 988_097_824, "float32", 4096).weights == 2 * 988_097_824
    assert fit_verdict(estimate.total, 10 * 2**30) == "fits"
    assert fit_verdict(estimate.total, int(estimate.total * 1.1)) == "tight"
    assert fit_verdict(estimate.total, estimate.total - 1) == "does not fit"


@contextlib.contextmanager
def vllm_serving(command, port: int, log_path: Path) -> Iterator[None]:
    """A real vLLM run from `command`, healthy on `port` (its output in `log_path`), stopped afterwards."""
    import os
    import time

    import httpx2 as httpx

    with log_path.open("w") as log:
        server = subprocess.Popen(command.argv, env=os.environ | command.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 600
            while True:
                assert server.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < end, "vLLM was not healthy within 600 s: " + log_path.read_text()[-3000:]
                time.sleep(1)
            yield
        finally:
            server.terminate()
            server.wait(timeout=60)


@pytest.mark.gpu
def test_vllm_serves_a_model_with_the_command_built_for_it(tiny_model_dir, tmp_path):
    if not vllm_available():
        pytest.skip("vLLM is not installed (it needs a CUDA build of torch)")
    from openai import OpenAI

    port = free_port()
    command = vllm_command(str(tiny_model_dir), DeploySettings(port=port, max_model_len=128), "tiny", "k", gpus="0")
    with vllm_serving(command, port, tmp_path / "vllm.log"):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.completions.create(model="tiny", prompt="modeldeck", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1


@pytest.mark.gpu
def test_vllm_serves_adapters_and_loads_one_while_it_serves(tiny_model_dir, tmp_path):
    """The command line built for adapters, and the runtime routes modeldeck calls, against a real vLLM."""
    if not vllm_available():
        pytest.skip("vLLM is not installed (it needs a CUDA build of torch)")
    import httpx2 as httpx

    from tests.tinymodel import make_tiny_adapter

    alpha = make_tiny_adapter(tiny_model_dir, tmp_path / "alpha", seed=1, rank=8)
    beta = make_tiny_adapter(tiny_model_dir, tmp_path / "beta", seed=2, rank=8)
    port = free_port()
    command = vllm_command(str(tiny_model_dir), DeploySettings(port=port, max_model_len=128), "tiny", "k", gpus="0",
                           adapters=[("alpha", str(alpha))])
    url, auth = f"http://127.0.0.1:{port}/v1", {"Authorization": "Bearer k"}
    with vllm_serving(command, port, tmp_path / "vllm.log"):
        listed = {m["id"]: m.get("parent") for m in httpx.get(url + "/models", headers=auth).json()["data"]}
        assert listed.get("alpha") == "tiny" and "tiny" in listed
        loaded = httpx.post(url + "/load_lora_adapter", headers=auth, json={"lora_name": "beta", "lora_path": str(beta)})
        assert loaded.status_code == 200, loaded.text
        for model in ("tiny", "alpha", "beta"):
            reply = httpx.post(url + "/completions", headers=auth, timeout=60,
                               json={"model": model, "prompt": "modeldeck", "max_tokens": 4, "temperature": 0})
            assert reply.status_code == 200, reply.text
        assert httpx.post(url + "/unload_lora_adapter", headers=auth, json={"lora_name": "beta"}).status_code == 200
