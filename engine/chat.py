"""The chat client: one streamed reply at a time from any OpenAI-compatible endpoint, over Server-Sent
Events with async httpx, and the numbers an engineer wants on each reply (time to first token, tokens/s,
token count).

Light (no torch): the dashboard's chat pane and `modeldeck chat` use it. Whatever goes wrong (the server
unreachable or gone mid-reply, a 401, a 400, a timeout) ends the stream with a ChatError whose message is
one line, worded for the user; the text received until then stays with the caller.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import httpx2 as httpx

from engine.errors import EngineError

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # the longest silence between two chunks (a big model's first token can be slow)


PARAM_LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "max_tokens": (1, 1_000_000)}
PARAM_LABELS = {"temperature": "Temperature", "top_p": "Top-p", "max_tokens": "Max tokens"}


@dataclass
class ChatParams:
    """The chat pane's settings, sent with each request."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> tuple[ChatParams, dict[str, str]]:
        """Typed text (empty: the default) to params, with what is wrong per field."""
        parsed, errors = {}, {}
        for name, (low, high) in PARAM_LIMITS.items():
            text = str(values.get(name, "")).strip()
            if not text:
                continue
            kind = int if name == "max_tokens" else float
            try:
                value = kind(text)
            except ValueError:
                errors[name] = f"{PARAM_LABELS[name]}: {text!r} is not {'a whole number' if kind is int else 'a number'}"
                continue
            if not low <= value <= high:
                shown = [f"{v:,}" if isinstance(v, int) else f"{v:g}" for v in (low, high)]
                errors[name] = f"{PARAM_LABELS[name]} must be from {shown[0]} to {shown[1]}"
                continue
            parsed[name] = value
        return cls(**parsed), errors

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReplyStats:
    """What a reply cost: measured by the client, from sending the request to its last byte."""

    ttft_s: float | None = None  # time to the first token
    usage_tokens: int | None = None  # as the server counts them (its usage chunk)
    chunks: int = 0  # content chunks received: the count when the server sends no usage (or was cut off)
    elapsed_s: float = 0.0
    finish: str | None = None  # stop | length | stopped (by the user) | error
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def tokens_per_s(self) -> float | None:
        """Decoding speed: the tokens after the first, over the time after the first."""
        if self.ttft_s is None or self.tokens < 2 or self.elapsed_s <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.elapsed_s - self.ttft_s)

    def describe(self) -> str:
        parts = []
        if self.ttft_s is not None:
            parts.append(f"first token {self.ttft_s * 1000:,.0f} ms")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:,.1f} tok/s")
        parts.append(f"{self.tokens:,} tokens")
        if self.finish == "length":
            parts.append("cut at max tokens")
        elif self.finish == "stopped":
            parts.append("stopped")
        return " · ".join(parts)

    def as_dict(self) -> dict:
        """Everything, to keep with a conversation (from_dict reads it back)."""
        return asdict(self) | {"tokens": self.tokens, "tokens_per_s": self.tokens_per_s}

    def summary(self) -> dict:
        """What a script wants to know about a reply."""
        return {"ttft_s": self.ttft_s, "tokens": self.tokens, "tokens_per_s": self.tokens_per_s,
                "elapsed_s": self.elapsed_s, "finish": self.finish}

    @classmethod
    def from_dict(cls, data: dict) -> ReplyStats:
        names = ("ttft_s", "usage_tokens", "chunks", "elapsed_s", "finish", "error")
        return cls(**{k: data[k] for k in names if k in data})


@dataclass
class Target:
    """Where to send requests: an endpoint's base URL (ending in /v1), its key, and the model name."""

    base_url: str
    api_key: str | None
    model: str


class ChatError(EngineError):
    """A reply that could not be had, in one line."""


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    stats: ReplyStats = field(default_factory=ReplyStats)


def new_client(read_timeout: float = READ_TIMEOUT_S) -> httpx.AsyncClient:
    """One client per chat pane: a kept connection saves ~20 ms a request."""
    return httpx.AsyncClient(timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S))


def _refusal(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error", {})
        message = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        message = None
    message = " ".join((message or body.decode("utf-8", "replace") or "no details").split())[:300]
    if status == 401:
        return f"the server refused the API key (401): {message}"
    if status == 404:
        return f"not found (404): {message}. Is the URL an OpenAI-compatible base ending in /v1?"
    if status < 500:
        return f"the server refused the request ({status}): {message}"
    return f"the server failed ({status}): {message}"


async def stream_chat(client: httpx.AsyncClient, target: Target, messages: list[dict], params: ChatParams,
                      stats: ReplyStats | None = None) -> AsyncIterator[Delta | Done]:
    """Yield the reply's text as it comes (Delta), then its stats (Done). Raises ChatError with one line.
    Cancelling the iteration (the user stopped the reply) closes the connection, which stops the server
    generating. `stats`, when given, is filled as the reply comes, so a stopped or failed reply keeps its
    numbers so far."""
    body = {"model": target.model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}} | params.as_dict()
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    stats = ReplyStats() if stats is None else stats
    start = time.perf_counter()
    try:
        async with client.stream("POST", target.base_url.rstrip("/") + "/chat/completions", json=body,
                                 headers=headers) as response:
            if response.status_code != 200:
                raise ChatError(_refusal(response.status_code, await response.aread()))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue  # not ours to judge: a proxy's keep-alive or the like
                if not isinstance(event, dict):
                    continue
                if "error" in event:  # vLLM and others report a failure inside the stream
                    error = event["error"]
                    raise ChatError("the server failed mid-reply: "
                                    + str(error.get("message") if isinstance(error, dict) else error)[:300])
                if event.get("usage") and event["usage"].get("completion_tokens") is not None:
                    stats.usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if stats.ttft_s is None:
                            stats.ttft_s = time.perf_counter() - start
                        stats.chunks += 1
                        stats.elapsed_s = time.perf_counter() - start
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        stats.finish = choice["finish_reason"]
            else:
                if stats.finish is None:  # the stream ended with neither [DONE] nor a finish reason
                    raise ChatError("the server closed the connection mid-reply")
    except httpx.ConnectError:
        raise ChatError(f"cannot reach {target.base_url}: is the server running?") from None
    except httpx.TimeoutException:
        raise ChatError("no answer from the server in time (connect "
                        f"{CONNECT_TIMEOUT_S:g} s, between chunks {client.timeout.read:g} s)") from None
    except (httpx.RemoteProtocolError, httpx.ReadError):
        if stats.finish is None:  # closed before the reply was finished; after it, nothing was lost
            raise ChatError("the server closed the connection mid-reply") from None
    except httpx.LocalProtocolError:  # its text would hold the key: a bad header is said without it
        raise ChatError("the request could not be sent: the API key or model name has characters HTTP "
                        "headers cannot carry (a stray space or line break?)") from None
    except httpx.HTTPError as exc:
        raise ChatError(f"the request failed: {type(exc).__name__}: {exc}") from None
    stats.elapsed_s = time.perf_counter() - start
    yield Done(stats)


async def list_models(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> list[str]:
    """The model names an endpoint serves (GET /models); raises ChatError with one line."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = await client.get(base_url.rstrip("/") + "/models", headers=headers)
    except httpx.ConnectError:
        raise ChatError(f"cannot reach {base_url}: is the server running?") from None
    except httpx.HTTPError as exc:
        raise ChatError(f"the request failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ChatError(_refusal(response.status_code, response.content))
    try:
        return [m["id"] for m in response.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ChatError(f"{base_url}/models did not answer as an OpenAI-compatible server does") from None
