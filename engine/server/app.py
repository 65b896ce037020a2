"""The HTTP front of the built-in server: FastAPI + uvicorn, the key, validation, limits, metrics.

Routes: GET /health and GET /metrics (Prometheus text) open; behind `Authorization: Bearer KEY`:
GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions and POST /v1/completions (streamed or
not), and vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (adapters served beside the base,
each under its own name, chosen per request by `model`). Every error is OpenAI-shaped JSON; input never gets a
5xx, and a connection stays usable after any error. A body over --max-body-bytes gets a 413 before it is read;
a prompt certainly longer than the context is refused before it is tokenized, and tokenizing runs on a small
pool of its own, so one huge request cannot stall the others. A stop ends every open stream with a final event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request  # module level: FastAPI reads the handlers' annotations from here
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from engine.server.adapters import AdapterError
from engine.server.api import (
    MAX_CHOICES,
    ChatRequest,
    CompletionRequest,
    LoadAdapter,
    RequestError,
    UnloadAdapter,
    message_dicts,
    parse,
    refuse_unsupported,
    sampling_of,
)
from engine.server.generation import Choice, Engine

API_KEY_ENV = "MODELDECK_API_KEY"
DISCONNECT_CHECK_S = 0.2  # how often a waiting non-streamed request checks that its client is still there
MAX_BODY_BYTES = 8 * 1024 * 1024
# A token is rarely more than a few characters; a prompt with more than this many per token of the context
# cannot fit, and is refused without tokenizing it.
MAX_CHARS_PER_TOKEN = 32
ABORT_AFTER_S = 2.0  # on a stop, what still generates then ends with finish_reason "abort"


class Guard:
    """Pure ASGI middleware, just inside Starlette's own error layer: the body is read here first, and one
    over the limit is refused with a 413 as soon as it is known to be (from Content-Length, or counted as
    it comes); an unexpected error becomes a 500 in OpenAI's shape and goes no further (Starlette's handler
    re-raises after answering, which resets a keep-alive connection)."""

    def __init__(self, app, max_body_bytes: int, on_status):
        self.app, self.max_body_bytes, self.on_status = app, max_body_bytes, on_status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = RequestError(f"the request body is over {self.max_body_bytes} bytes", 413,
                                 code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit():
            return await self._answer(send, RequestError("Content-Length is not a number"))
        if int(length) > self.max_body_bytes:
            return await self._answer(send, too_large)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._answer(send, too_large)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the disconnect, when it comes

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception as exc:  # noqa: BLE001 - answered, and the server goes on
            traceback.print_exc()  # for whoever reads the server's log: this is a bug of ours
            if not started:
                await self._answer(send, RequestError(f"internal error: {type(exc).__name__}: {exc}", 500,
                                                      kind="server_error"))

    async def _answer(self, send, error: RequestError) -> None:
        self.on_status(error.status)
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(engine: Engine, served_name: str, api_key: str, default_max_tokens: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="modeldeck", docs_url=None, redoc_url=None)
    created = int(time.time())
    expected = f"Bearer {api_key}".encode()
    tokenizing = ThreadPoolExecutor(2, thread_name_prefix="tokenize")  # bounded: a flood waits here, not everywhere
    loading = ThreadPoolExecutor(1, thread_name_prefix="adapters")  # reading an adapter's files; one at a time

    def error(exc: RequestError) -> JSONResponse:
        engine.metrics.request(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    def authorized(request: Request) -> bool:
        """Every /v1 route checks the key itself (an HTTP middleware would add its cost to every token
        streamed). Bytes, as the header came: a non-ASCII header is simply not the key."""
        sent = request.headers.get("authorization", "").encode("latin-1")
        return secrets.compare_digest(sent, expected)

    def unauthorized() -> JSONResponse:
        return error(RequestError("invalid API key: send it as 'Authorization: Bearer KEY'", 401,
                                  code="invalid_api_key", kind="authentication_error"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's 404 and 405, in OpenAI's shape."""
        words = {404: f"no route {request.method} {request.url.path}",
                 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(RequestError(words.get(exc.status_code, str(exc.detail)), exc.status_code,
                                  code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str) -> dict:
        """As vLLM lists them: an adapter's `parent` is the base it is applied to, its `root` where it was read."""
        adapter = engine.adapters.get(name)
        return {"id": name, "object": "model", "created": created, "owned_by": "modeldeck",
                "root": adapter.path if adapter else served_name, "parent": served_name if adapter else None}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorized(request):
            return unauthorized()
        # not counted: the load is the generation requests
        return {"object": "list", "data": [model_card(name) for name in (served_name, *list(engine.adapters))]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        if not authorized(request):
            return unauthorized()
        try:
            served(model_id)
        except RequestError as exc:
            return error(exc)
        return model_card(model_id)

    def served(name: str):
        """The adapter a request names (None: the base model); a name not served is a 404."""
        if name == served_name:
            return None
        adapter = engine.adapters.get(name)
        if adapter is None:
            names = ", ".join(f"'{n}'" for n in (served_name, *list(engine.adapters)))
            raise RequestError(f"The model '{name}' does not exist; this server serves {names}", 404,
                               param="model", code="model_not_found")
        return adapter

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        """vLLM's route: serve a LoRA adapter of this base under a name, without a restart."""
        if not authorized(request):
            return unauthorized()
        try:
            body = parse(LoadAdapter, await request.body())
            if body.lora_name == served_name or body.lora_name in engine.adapters:
                raise RequestError(f"The lora adapter '{body.lora_name}' has already been loaded" if
                                   body.lora_name in engine.adapters else
                                   f"'{body.lora_name}' is the base model's name here; choose another",
                                   param="lora_name", code="invalid_value")
            try:
                await asyncio.get_running_loop().run_in_executor(loading, engine.load_adapter, body.lora_name,
                                                                 body.lora_path)
            except AdapterError as exc:
                raise RequestError(str(exc), param="lora_path", code="invalid_value") from None
        except RequestError as exc:
            return error(exc)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        """vLLM's route: stop serving an adapter; its requests still running finish, new ones get a 404."""
        if not authorized(request):
            return unauthorized()
        try:
            body = parse(UnloadAdapter, await request.body())
            try:
                engine.unload_adapter(body.lora_name)
            except KeyError:
                raise RequestError(f"The lora adapter '{body.lora_name}' cannot be found", 404, param="lora_name",
                                   code="model_not_found") from None
        except RequestError as exc:
            return error(exc)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    def check_size(characters: int, param: str) -> None:
        if characters > engine.context * MAX_CHARS_PER_TOKEN:
            raise RequestError(f"the prompt is {characters} characters, more than this model's context of "
                               f"{engine.context} tokens can hold", param=param, code="context_length_exceeded")

    def offered_tools(request: ChatRequest, tokenizer) -> tuple[list[dict] | None, dict | None]:
        """The tools the model is offered, and how its reply is read back for calls (None, None: no tools)."""
        if not request.tools or request.tool_choice == "none":
            return None, None
        if "tools" not in str(getattr(tokenizer, "chat_template", "") or ""):
            raise RequestError("'tools': this model's chat template offers no tools", param="tools",
                               code="unsupported_parameter")
        template = engine.response_template(tokenizer)
        if template is None:
            raise RequestError("'tools': this model's tool calls cannot be read back (its tokenizer has no "
                               "response_template)", param="tools", code="unsupported_parameter")
        return [t.model_dump(exclude_none=True) for t in request.tools], template

    def chat_prompt(request: ChatRequest, tools: list[dict] | None, tokenizer) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError("this model has no chat template: use /v1/completions with a prompt",
                               param="messages", code="no_chat_template")
        try:
            text = tokenizer.apply_chat_template(message_dicts(request.messages), tokenize=False,
                                                 add_generation_prompt=True, **({"tools": tools} if tools else {}))
        except Exception as exc:  # noqa: BLE001 - the template's own refusal (jinja's raise_exception, say)
            raise RequestError(f"this model's chat template cannot render these messages: {exc}",
                               param="messages", code="invalid_value") from None
        check_size(len(text), "messages")  # what the template made of it (tool calls' arguments included)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError("the messages make an empty prompt", param="messages", code="invalid_value")
        return ids

    def text_prompts(request: CompletionRequest, tokenizer) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for i, item in enumerate(prompt):
            ids = tokenizer(item)["input_ids"] if isinstance(item, str) else list(item)
            if any(t >= engine.vocab_size for t in ids):
                raise RequestError(f"'prompt[{i}]' holds a token id over this model's vocabulary "
                                   f"({engine.vocab_size})", param="prompt", code="invalid_value")
            if not ids:
                raise RequestError(f"'prompt[{i}]' is empty", param="prompt", code="invalid_value")
            prompts.append(ids)
        return prompts

    def fit(prompt_ids: list[int], wanted: int | None, param: str) -> int:
        room = engine.context - len(prompt_ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {engine.context}",
                               param=param, code="context_length_exceeded")
        return min(wanted or default_max_tokens, room)

    async def run(request: Request, chat: bool):
        if not authorized(request):
            return unauthorized()
        try:
            body = parse(ChatRequest if chat else CompletionRequest, await request.body())
            adapter = served(body.model)
            tokenizer = engine.tokenizer_of(adapter)
            refuse_unsupported(body)
            sampling = sampling_of(body, default_max_tokens, engine.vocab_size)
            if chat and body.response_format is not None:
                grammar = await asyncio.get_running_loop().run_in_executor(tokenizing, engine.grammar_for,
                                                                           body.response_format)
                sampling = _with(sampling, grammar=grammar)
            count = (body.n or 1) * (1 if chat or isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
                                     else len(body.prompt))
            if count > MAX_CHOICES:
                raise RequestError(f"{count} choices asked (prompts × n); at most {MAX_CHOICES} in one request",
                                   param="n" if chat else "prompt", code="invalid_value")
            loop = asyncio.get_running_loop()
            if chat:
                check_size(sum(len(m.content if isinstance(m.content, str) else
                                   "".join(p.text for p in m.content or [])) for m in body.messages), "messages")
                tools, response_template = offered_tools(body, tokenizer)
                prompts = [await loop.run_in_executor(tokenizing, chat_prompt, body, tools, tokenizer)]
            else:
                prompt = body.prompt
                check_size(len(prompt) if isinstance(prompt, str) else
                           sum(len(p) for p in prompt if isinstance(p, str)), "prompt")
                prompts = await loop.run_in_executor(tokenizing, text_prompts, body, tokenizer)
            wanted = body.max_completion_tokens or body.max_tokens if chat else body.max_tokens
            limits = [fit(ids, wanted, "messages" if chat else "prompt") for ids in prompts]
            if body.stream_options is not None and not body.stream:
                raise RequestError("'stream_options' is only for streamed requests", param="stream_options")
            if adapter is not None:  # unloaded while it was read: a 404, as for any request after the unload
                adapter = served(body.model)
        except RequestError as exc:
            return error(exc)
        n = body.n or 1
        # tool calls to read from the replies (one at most, where parallel calls are refused)
        reading = (tools, response_template, body.parallel_tool_calls is False) if chat and tools else None

        def start() -> list[Choice]:
            choices = []
            for ids, limit in zip(prompts, limits):
                for j in range(n):
                    seed = None if sampling.seed is None else sampling.seed + j  # n choices, n different samples
                    choices.append(engine.submit(ids, _with(sampling, max_tokens=limit, seed=seed),
                                                 siblings=len(prompts) * n - 1, adapter=adapter))
            return choices

        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt counted once, as OpenAI counts
        engine.metrics.prompt_tokens.inc(prompt_tokens)
        if body.stream:
            engine.metrics.request(200)
            usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
            # started by the stream itself: a client gone before it begins leaves nothing generating
            return StreamingResponse(stream(start, ident, body.model, chat, prompt_tokens, usage_wanted, reading),
                                     media_type="text/event-stream")
        choices = start()
        results = await asyncio.gather(*(whole(c, request) for c in choices))
        if any(r is None for r in results):  # the client left: nobody reads an answer
            return Response(status_code=499)
        failed = next((r for r in results if isinstance(r, RequestError)), None)
        if failed is not None:
            return error(failed)
        out = []
        for i, (text, finish, logprobs) in enumerate(results):
            if chat:
                message = {"role": "assistant", "content": text}
                if reading:
                    content, calls = engine.read_tool_calls(choices[i], *reading)
                    if calls:
                        message, finish = {"role": "assistant", "content": content or None, "tool_calls": calls}, \
                            "tool_calls"
                choice = {"index": i, "message": message, "finish_reason": finish,
                          "logprobs": {"content": logprobs} if sampling.logprobs is not None else None}
            else:
                choice = {"index": i, "text": text, "finish_reason": finish,
                          "logprobs": completion_logprobs(logprobs) if sampling.logprobs is not None else None}
            out.append(choice)
        completion = sum(c.generated for c in choices)
        engine.metrics.request(200)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": out, "usage": usage(prompt_tokens, completion)}

    async def whole(choice: Choice, request: Request):
        text, finish, logprobs = "", "length", []
        async for event in events(choice, request):
            if event[0] == "delta":
                text += event[1]
                logprobs += event[2]
            elif event[0] == "error":
                return RequestError(event[1], 500, kind="server_error")
            else:
                finish = event[1]
                return text, finish, logprobs
        return None

    async def events(choice: Choice, request: Request | None = None) -> AsyncIterator[tuple]:
        """The choice's events as they come. A client that disconnects stops its generation (a streamed
        one is noticed when its stream closes)."""
        getter = None  # one pending get at a time: cancelling a get that timed out could drop its event
        loop = asyncio.get_running_loop()
        try:
            while request is None:  # a stream: its closing is what says the client left; no timer per token
                event = await choice.out.get()
                yield event
                if event[0] in ("done", "error"):
                    return
            checked = loop.time()
            while True:
                if loop.time() - checked > DISCONNECT_CHECK_S:  # by the clock: tokens may never pause
                    checked = loop.time()
                    if await request.is_disconnected():
                        return
                if getter is None and not choice.out.empty():  # what is there already, without a timer each
                    event = choice.out.get_nowait()
                else:
                    getter = getter or asyncio.ensure_future(choice.out.get())
                    done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_CHECK_S)
                    if not done:
                        continue
                    event, getter = getter.result(), None
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            if getter is not None:
                getter.cancel()
            if not choice.ended:
                choice.cancel()

    async def stream(start, ident: str, model_name: str, chat: bool, prompt_tokens: int, usage_wanted: bool, reading):
        choices: list[Choice] = []
        try:
            choices = start()
            async for chunk in chunks(choices, ident, model_name, chat, prompt_tokens, usage_wanted, reading):
                yield chunk
        finally:
            for choice in choices:
                if not choice.ended:
                    choice.cancel()

    async def chunks(choices: list[Choice], ident: str, model_name: str, chat: bool, prompt_tokens: int,
                     usage_wanted: bool, reading):
        """The stream's chunks. Where tools were offered a reply is read whole first (a tool call is only
        known once closed): its content, then its calls, then its end."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        logprobs_wanted = choices[0].sampling.logprobs is not None

        def chunk(index: int, text: str | None = None, finish: str | None = None, logprobs: list | None = None,
                  role: bool = False, calls: list[dict] | None = None) -> str:
            lp = None
            if logprobs_wanted and logprobs is not None:
                lp = {"content": logprobs} if chat else completion_logprobs(logprobs)
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                if calls:
                    delta["tool_calls"] = [call | {"index": i} for i, call in enumerate(calls)]
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}
            data = {"id": ident, "object": kind, "created": int(time.time()), "model": model_name,
                    "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, choice: Choice) -> None:
            async for event in events(choice):
                await merged.put((index, event))

        async def one() -> AsyncIterator[tuple]:  # a single choice needs no merging
            async for event in events(choices[0]):
                yield 0, event

        async def all_merged() -> AsyncIterator[tuple]:
            while True:
                yield await merged.get()

        if chat:
            for i in range(len(choices)):
                yield chunk(i, role=True)
        pumps = [asyncio.ensure_future(pump(i, c)) for i, c in enumerate(choices)] if len(choices) > 1 else []
        arrivals = one() if len(choices) == 1 else all_merged()
        held_logprobs: dict[int, list] = {}
        try:
            open_choices = len(choices)
            while open_choices:
                index, event = await anext(arrivals)
                if event[0] == "delta":
                    if reading:  # read whole at the end; its logprobs go with its content then
                        held_logprobs.setdefault(index, []).extend(event[2])
                    elif event[1] or event[2]:
                        yield chunk(index, event[1], logprobs=event[2])
                elif event[0] == "error":
                    yield f"data: {json.dumps(RequestError(event[1], 500, kind='server_error').body())}\n\n"
                    open_choices -= 1
                else:
                    finish = event[1]
                    if reading:
                        content, calls = engine.read_tool_calls(choices[index], *reading)
                        if content or held_logprobs.get(index):
                            yield chunk(index, content, logprobs=held_logprobs.get(index))
                        if calls:
                            yield chunk(index, calls=calls)
                            finish = "tool_calls"
                    yield chunk(index, finish=finish)
                    open_choices -= 1
            if usage_wanted:
                data = {"id": ident, "object": kind, "created": int(time.time()), "model": model_name,
                        "choices": [], "usage": usage(prompt_tokens, sum(c.generated for c in choices))}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
            await arrivals.aclose()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    app.add_middleware(Guard, max_body_bytes=max_body_bytes, on_status=engine.metrics.request)
    return app


def _with(sampling, **changes):
    import dataclasses

    return dataclasses.replace(sampling, **changes)


def completion_logprobs(entries: list[dict]) -> dict:
    """Logprobs as the legacy completions API gives them."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (Hugging Face layout)")
    parser.add_argument("--served-name", required=True, help="the base model's name in requests")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a LoRA adapter folder (PEFT) served beside the base under NAME (repeatable; implies "
                             "--enable-lora)")
    parser.add_argument("--enable-lora", action="store_true",
                        help="take adapters while serving (POST /v1/load_lora_adapter); costs the batching cache's "
                             "prefix sharing once one is loaded, and CUDA graphs")
    parser.add_argument("--max-lora-rank", type=int, default=0, help="refuse adapters of a higher rank (0: any)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-concurrent", type=int, default=8,
                        help="choices generated at once on the plain path, and what the CPU's KV cache is sized for")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger requests get a 413")
    parser.add_argument("--no-batching", action="store_true",
                        help="every request on the plain path (a token each in turn), without continuous batching")
    args = parser.parse_args(argv)
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        parser.exit(2, f"set {API_KEY_ENV}: every /v1 route needs the key\n")
    adapters = []
    for given in args.adapter:
        name, sep, path = given.partition("=")
        if not sep or not name or not path:
            parser.exit(2, f"--adapter {given!r}: give it as NAME=PATH\n")
        if name == args.served_name or name in dict(adapters):
            parser.exit(2, f"--adapter {given!r}: the name {name!r} is served already\n")
        adapters.append((name, path))
    print(f"loading {args.model}", flush=True)
    engine = Engine(args.model, args.dtype, args.max_model_len, args.max_concurrent, batching=not args.no_batching,
                    log=lambda line: print(line, flush=True), lora=args.enable_lora or bool(adapters),
                    max_lora_rank=args.max_lora_rank)
    for name, path in adapters:
        try:
            engine.load_adapter(name, path)
        except AdapterError as exc:
            engine.shutdown()
            parser.exit(2, f"adapter {name!r}: {exc}\n")
    print(f"loaded on {engine.device}; context {engine.context} tokens; serving {args.served_name!r} "
          f"on http://{args.host}:{args.port}/v1", flush=True)
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn stops accepting on SIGTERM and waits for what it is answering; what still generates
        ABORT_AFTER_S later ends with a final event, so every stream closes properly."""

        def handle_exit(self, sig, frame) -> None:
            loop = asyncio.get_event_loop()
            loop.call_later(ABORT_AFTER_S, engine.abort_all)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(engine, args.served_name, api_key, max_body_bytes=args.max_body_bytes),
                            host=args.host, port=args.port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=ABORT_AFTER_S + 1)  # within the supervisor's stop deadline
    try:
        Server(config).run()
    finally:
        engine.shutdown()
