"""The built-in OpenAI-compatible server: FastAPI + uvicorn over transformers (PEFT for an adapter), so a
model can be served and used on a machine without a GPU.

    MODELDECK_API_KEY=... python -m engine.server --model PATH [--adapter PATH] --served-name NAME --port N

Routes: GET /health, GET /metrics (Prometheus text), and, behind `Authorization: Bearer KEY`,
GET /v1/models, POST /v1/chat/completions (streamed or not), POST /v1/completions. Errors are
OpenAI-shaped JSON. One thread generates for up to --max-concurrent requests at once, a token for each
in turn, so a short request is not stuck behind a long one; more wait in a queue, in order.
The port is opened only once the model is loaded, so /health answering means "ready" (as with vLLM).
The key comes from the environment, never the command line (which `ps` shows to everyone).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import (  # module level: FastAPI reads the handlers' annotations from here
    FastAPI,
    Request,
)
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

API_KEY_ENV = "MODELDECK_API_KEY"
MAX_STOP_SEQUENCES = 4
DISCONNECT_CHECK_S = 0.2  # how often a waiting non-streamed request checks that its client is still there


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# -- request parameters -------------------------------------------------------------------------------


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def _number(body: dict, name: str, default: float, low: float, high: float, *, integer: bool = False,
            low_open: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}",
                           param=name, code="invalid_type")
    if value < low or value > high or (low_open and value == low):
        bound = f"above {low}" if low_open else f"at least {low}"
        raise RequestError(f"'{name}' must be {bound} and at most {high}; got {value}", param=name,
                           code="invalid_value")
    return value


def parse_sampling(body: dict, default_max_tokens: int) -> Sampling:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of non-empty strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop", code="invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, not {json.dumps(seed)}", param="seed", code="invalid_type")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return Sampling(
        max_tokens=_number({"max_tokens": limit}, "max_tokens", default_max_tokens, 1, 1_000_000, integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0, 1, low_open=True),
        stop=stop, seed=seed)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages",
                           code="invalid_value" if isinstance(messages, list) else "invalid_type")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}].role",
                               code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be text", param=f"messages[{i}].content",
                               code="invalid_type")
        parsed.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return parsed


# -- the model and its one generation thread ---------------------------------------------------------


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop  # the request's: the generation thread hands it each event
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("delta", text) ..., then ("done", ...)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)  # time to first token counts the wait too

    def put(self, event: tuple) -> None:
        """From the generation thread: wakes the request's coroutine at once (no polling)."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)


class Engine:
    """The loaded model and the thread that generates for the active requests, a token each in turn."""

    def __init__(self, model_path: str, adapter: str | None, dtype: str, max_model_len: int | None,
                 max_concurrent: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(adapter or model_path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        device = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device)
        # transformers 5 names the KV cache argument `cache` (and warns on every `past_key_values`)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.eval()
        self.device = device
        config_limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context = min(max_model_len or config_limit, config_limit)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.max_concurrent = max_concurrent
        self.metrics = Metrics()
        threading.Thread(target=self._serve, name="generate", daemon=True).start()

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template: use /v1/completions with a prompt",
                               code="no_chat_template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def check_length(self, prompt_ids: list[int], sampling: Sampling, param: str) -> None:
        if len(prompt_ids) >= self.context:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context}",
                               param=param, code="context_length_exceeded")
        sampling.max_tokens = min(sampling.max_tokens, self.context - len(prompt_ids))

    def submit(self, prompt_ids: list[int], sampling: Sampling) -> Job:
        """Queue a generation (called on the event loop); its events arrive on job.out."""
        job = Job(prompt_ids, sampling, asyncio.get_running_loop())
        self.jobs.put(job)
        return job

    def _serve(self) -> None:
        # Inference mode for the whole thread: the generations interleave, so none may enter or leave it.
        with self.torch.inference_mode():
            self._round_robin()

    def _round_robin(self) -> None:
        """Round-robin over the active generations, one token each per turn; admit queued requests
        between turns (waiting for one only when nothing is active)."""
        active: list[tuple[Job, Iterator[None]]] = []
        while True:
            while len(active) < self.max_concurrent:
                try:
                    job = self.jobs.get(block=not active)
                except queue.Empty:
                    break
                active.append((job, self._generate(job)))
            for entry in list(active):
                job, steps = entry
                try:
                    next(steps)
                except StopIteration:
                    active.remove(entry)
                except Exception as exc:  # noqa: BLE001 - a failed generation ends its request, not the server
                    job.put(("error", f"{type(exc).__name__}: {exc}"))
                    active.remove(entry)

    def _generate(self, job: Job) -> Iterator[None]:
        """One request's generation, yielding after each token so others can take theirs."""
        torch, s = self.torch, job.sampling
        generator = torch.Generator(device=self.device)
        generator.manual_seed(s.seed if s.seed is not None else int.from_bytes(os.urandom(4), "little"))
        start, first, tokens, text, sent, finish = time.perf_counter(), None, [], "", "", "length"
        matched_stop = False
        ids, past = torch.tensor([job.prompt_ids], device=self.device), None
        for _ in range(s.max_tokens):
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: past})
            past = getattr(out, self.cache_arg)
            token = self._sample(out.logits[0, -1].float(), s, generator)
            if token in self.eos:
                finish = "stop"
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            hit = min((i for i in (text.find(stop, max(len(sent) - len(stop), 0)) for stop in s.stop) if i >= 0),
                      default=-1)
            if hit >= 0:
                text, finish, matched_stop = text[:hit], "stop", True
            if first is None:
                first = time.perf_counter() - job.submitted
            # Send what is certain: not a half character, nor an ending that may yet become a stop string.
            ready = len(text) if matched_stop else len(text) - held_back(text, s.stop)
            if ready > len(sent) and not text[:ready].endswith("\ufffd"):
                job.put(("delta", text[len(sent):ready]))
                sent = text[:ready]
            if matched_stop:
                break
            ids = torch.tensor([[token]], device=self.device)
            yield
        if not matched_stop and len(text) > len(sent):  # what was held back, at the end of the reply
            job.put(("delta", text[len(sent):].rstrip("\ufffd")))
        elapsed = time.perf_counter() - start
        self.metrics.finished(len(job.prompt_ids), len(tokens), first, elapsed)
        job.put(("done", finish, len(tokens), first))

    def _sample(self, logits, s: Sampling, generator) -> int:
        torch = self.torch
        if s.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < s.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the beginning of a stop string."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


class Metrics:
    """Counters for /metrics, updated by the generation thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.prompt_tokens = self.generated_tokens = 0
        self.ttft_sum, self.ttft_count = 0.0, 0
        self.generation_seconds = 0.0
        self.last_tokens_per_s = 0.0

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def finished(self, prompt: int, generated: int, ttft: float | None, elapsed: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            self.generation_seconds += elapsed
            if ttft is not None:
                self.ttft_sum += ttft
                self.ttft_count += 1
            if generated and elapsed > 0:
                self.last_tokens_per_s = generated / elapsed

    def text(self) -> str:
        with self.lock:
            lines = ["# HELP modeldeck_requests_total Requests answered, by HTTP status.",
                     "# TYPE modeldeck_requests_total counter"]
            lines += [f'modeldeck_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, kind, value, help_text in [
                ("prompt_tokens_total", "counter", self.prompt_tokens, "Prompt tokens processed."),
                ("generation_tokens_total", "counter", self.generated_tokens, "Tokens generated."),
                ("generation_seconds_total", "counter", round(self.generation_seconds, 6),
                 "Time spent generating, summed over requests (interleaved ones overlap)."),
                ("time_to_first_token_seconds_sum", "counter", round(self.ttft_sum, 6), "Sum of times to first token."),
                ("time_to_first_token_seconds_count", "counter", self.ttft_count, "Requests with a first token."),
                ("tokens_per_second", "gauge", round(self.last_tokens_per_s, 3), "Tokens/s of the last request (interleaved requests share the model)."),
            ]:
                lines += [f"# HELP modeldeck_{name} {help_text}", f"# TYPE modeldeck_{name} {kind}",
                          f"modeldeck_{name} {value}"]
        return "\n".join(lines) + "\n"


# -- HTTP ---------------------------------------------------------------------------------------------


def create_app(engine: Engine, served_name: str, api_key: str, default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title="modeldeck", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def error(exc: RequestError) -> JSONResponse:
        engine.metrics.request(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorized(request: Request) -> bool:
        """Every /v1 route checks the key itself (an HTTP middleware would add its cost to every token
        streamed)."""
        return secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}")

    def unauthorized() -> JSONResponse:
        return error(RequestError("invalid API key: send it as 'Authorization: Bearer KEY'", 401,
                                  code="invalid_api_key"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(RequestError(f"{type(exc).__name__}: {exc}", 500, kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return unauthorized()
        engine.metrics.request(200)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "modeldeck"}]}

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") != served_name:
            raise RequestError(f"model {body.get('model')!r} is not served here; this server serves {served_name!r}",
                               param="model", code="model_not_found")
        if body.get("n", 1) != 1:
            raise RequestError("'n' must be 1", param="n", code="invalid_value")
        return body

    async def run(request: Request, chat: bool):
        if not authorized(request):
            return unauthorized()
        try:
            body = await body_of(request)
            sampling = parse_sampling(body, default_max_tokens)
            if chat:
                prompt_ids = await asyncio.to_thread(engine.chat_prompt, parse_messages(body))
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str) or not prompt:
                    raise RequestError("'prompt' must be a non-empty string", param="prompt", code="invalid_value")
                prompt_ids = await asyncio.to_thread(engine.text_prompt, prompt)
            engine.check_length(prompt_ids, sampling, "messages" if chat else "prompt")
        except RequestError as exc:
            return error(exc)
        job = engine.submit(prompt_ids, sampling)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        options = body.get("stream_options")
        usage_wanted = isinstance(options, dict) and bool(options.get("include_usage"))
        engine.metrics.request(200)
        if body.get("stream"):
            return StreamingResponse(stream(job, ident, kind, chat, len(prompt_ids), usage_wanted),
                                     media_type="text/event-stream")
        text, finish, count = "", "length", 0
        async for event in events(job, request):
            if event[0] == "delta":
                text += event[1]
            elif event[0] == "error":
                return error(RequestError(event[1], 500, kind="server_error"))
            else:
                finish, count = event[1], event[2]
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": ident, "object": kind, "created": int(time.time()), "model": served_name, "choices": [choice],
                "usage": usage(len(prompt_ids), count)}

    async def events(job: Job, request: Request | None = None) -> AsyncIterator[tuple]:
        """The generation thread's output, without blocking the event loop. A client that disconnects
        stops its generation (a streamed one is noticed when its stream closes)."""
        getter = None  # one pending get at a time: cancelling a get that timed out could drop its event
        try:
            while True:
                getter = getter or asyncio.ensure_future(job.out.get())
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_CHECK_S)
                if not done:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                event, getter = getter.result(), None
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            if getter is not None:
                getter.cancel()
            job.cancelled.set()  # the client went away: stop generating for it

    async def stream(job: Job, ident: str, kind: str, chat: bool, prompt_tokens: int, usage_wanted: bool):
        def chunk(delta: dict | None = None, text: str | None = None, finish: str | None = None) -> str:
            choice = ({"index": 0, "delta": delta or {}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None})
            data = {"id": ident, "object": kind + ("" if not chat else ".chunk"), "created": int(time.time()),
                    "model": served_name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        if chat:
            yield chunk({"role": "assistant", "content": ""})
        async for event in events(job):
            if event[0] == "delta":
                yield chunk({"content": event[1]}, event[1])
            elif event[0] == "error":
                yield f"data: {json.dumps(RequestError(event[1], 500, kind='server_error').body())}\n\n"
                return
            else:
                yield chunk(finish=event[1])
                if usage_wanted:
                    data = {"id": ident, "object": kind + (".chunk" if chat else ""), "created": int(time.time()),
                            "model": served_name, "choices": [], "usage": usage(prompt_tokens, event[2])}
                    yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (Hugging Face layout)")
    parser.add_argument("--adapter", help="a PEFT adapter folder to serve on the model")
    parser.add_argument("--served-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-concurrent", type=int, default=8,
                        help="requests generated at once, a token each in turn; more wait in a queue")
    args = parser.parse_args(argv)
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        parser.exit(2, f"set {API_KEY_ENV}: every /v1 route needs the key\n")
    print(f"loading {args.model}" + (f" with adapter {args.adapter}" if args.adapter else ""), flush=True)
    engine = Engine(args.model, args.adapter, args.dtype, args.max_model_len, args.max_concurrent)
    print(f"loaded on {engine.device}; context {engine.context} tokens; serving {args.served_name!r} "
          f"on http://{args.host}:{args.port}/v1", flush=True)
    import uvicorn

    # uvicorn stops cleanly on SIGTERM: it stops accepting, finishes what it is answering, and exits.
    uvicorn.run(create_app(engine, args.served_name, api_key), host=args.host, port=args.port, log_level="info",
                access_log=False, timeout_graceful_shutdown=3)  # within the supervisor's stop deadline


if __name__ == "__main__":
    main()

