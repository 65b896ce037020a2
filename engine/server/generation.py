"""Generation for the built-in server: the model, and two ways to run a request's choices.

- **Batched** (most requests): transformers' continuous batching (`init_continuous_batching`, paged KV
  cache), the engine behind `transformers serve --continuous-batching`. Requests join and leave the batch
  at every step; temperature, top-p and greedy decoding are per request.
- **Plain** (what batching cannot honour exactly: a seed of the request's own, presence and frequency
  penalties, logit biases, logprobs): our own steps, a token for each of its requests in turn, with their
  own KV caches, on the same weights.
- **Lone**: a request that arrives when nothing else is being generated starts on the plain path too, which
  for one request is the model's own forward without the batching manager's bookkeeping (about a tenth
  faster on a CPU); the moment another batchable request arrives it is handed over to the batch, its
  generated tokens joining its prompt (one prefill).

One thread runs the model: the plain steps run inside the batching manager's own loop, a round of them before
each batched step. Two threads that both run torch ops on a CPU each keep a team of OpenMP threads, and with
more of those than cores libgomp stops spinning and sleeps between ops: measured here, a plain forward ran
15-20% slower once any second thread had run one op, whatever it did after. Without batching the plain path
has a thread of its own.

Either way a choice's tokens become text through one `TextStream` (incremental decoding, stop strings
never sent in part), and reach the request's coroutine on the event loop as events:
("delta", text, logprobs), then ("done", finish_reason, tokens, time_to_first_token) or ("error", message).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engine.server.adapters import Adapter, AdapterError, Hooks, Stack, read_adapter, route, routing
from engine.server.api import Sampling
from engine.server.metrics import Metrics

GREEDY_TOP_P = 1e-9
PAGE_TOKENS = 256  # the paged cache's block size (transformers' default)
CPU_CACHE_TOKENS_PER_REQUEST = 2048  # on a CPU the cache is sized, not a share of the memory: requests wait


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the beginning of a stop string."""
    return max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)


class TextStream:
    """Token ids in, text out: decodes incrementally (a window, not the whole reply each time), never sends
    half a character nor the start of what may become a stop string, and says when a stop string was met."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.prefix, self.read = 0, 0  # the decoded window: tokens[prefix:read] were turned into text
        self.text, self.sent = "", 0
        self.stopped = False

    def add(self, token: int) -> str:
        """One more token; what can be sent now."""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)
        return self._ready()

    def _ready(self) -> str:
        if self.stops and not self.stopped:
            start = max(self.sent - max(map(len, self.stops)), 0)
            hits = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if self.stopped else len(self.text) - held_back(self.text, self.stops)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def rest(self) -> str:
        """At the end: what was held back (a stop string's beginning that never became one, a last
        character still incomplete), looked at for stop strings once more."""
        if self.stopped:
            return ""
        tail = self.tokenizer.decode(self.tokens[self.prefix:], skip_special_tokens=True)
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        self.text += tail[len(before):].rstrip("\ufffd")
        self.prefix = self.read = len(self.tokens)
        delta = self._ready()
        if not self.stopped:  # nothing more can come to complete a stop string
            delta += self.text[self.sent:]
            self.sent = len(self.text)
        return delta


_ids = itertools.count()


@dataclass
class Choice:
    """One choice of a request being generated. Its events reach the request's coroutine on `out`."""

    prompt_ids: list[int]
    sampling: Sampling
    stream: TextStream
    loop: asyncio.AbstractEventLoop  # the request's: events are handed to it, no polling
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)  # time to first token counts the wait too
    id: str = field(default_factory=lambda: f"c{next(_ids)}")
    first: float | None = None
    generated: int = 0
    ended: bool = False
    on_cancel: Callable[[], None] | None = None
    pending_logprobs: list[dict] = field(default_factory=list)
    ending: threading.Lock = field(default_factory=threading.Lock)  # the loop and the plain thread may both end it
    eos: int | None = None  # the end-of-sequence token it ended on
    hand_over: bool = False  # set on the event loop: a lone choice on the plain path moves to the batch
    batch: object | None = None  # the batching manager that took it, while it is there
    adapter: Adapter | None = None  # the adapter it is generated with (None: the base model)
    eos_ids: frozenset[int] = frozenset()  # the tokens that end it: the base's, and its adapter's tokenizer's

    def put(self, event: tuple) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)

    def cancel(self) -> None:
        """The client went away: stop generating for it."""
        self.cancelled.set()
        if self.on_cancel is not None and not self.ended:
            self.on_cancel()


class Engine:
    """The loaded model, the batching manager and the plain thread."""

    def __init__(self, model_path: str, dtype: str, max_model_len: int | None, max_concurrent: int = 8,
                 batching: bool = True, log: Callable[[str], None] = print, lora: bool = False,
                 max_lora_rank: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        device = "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device)
        self.model, self.device = model.eval(), device
        # Adapters (engine/server/adapters.py): those requests may name, and the stack whose weights apply (these,
        # and any still used by a request after it was unloaded), swapped in between two forwards.
        self.lora, self.max_lora_rank = lora, max_lora_rank
        self.adapters: dict[str, Adapter] = {}
        self._stack = Stack.of([])
        self._stack_stale = False
        self._hooks = Hooks(model)
        self._routable = True  # whether a batched step's requests can be read (else adapters run on the plain path)
        self._adapters_changing = threading.Lock()
        # transformers 5 names the KV cache argument `cache` (and warns on every `past_key_values`)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        config_limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context = min(max_model_len or config_limit, config_limit)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        eos = model.generation_config.eos_token_id if model.generation_config else None
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)
        self.max_concurrent = max_concurrent
        self.metrics = Metrics()
        self.open: dict[str, Choice] = {}  # every choice not ended yet, for a shutdown to end
        self.plain_jobs: queue.Queue[Choice] = queue.Queue()
        self.plain_active: set[str] = set()  # the plain steps' own: only they end them
        self._plain: list[tuple[Choice, Iterator[None]]] = []  # touched only by the thread that runs the model
        # Held by whatever runs the model (the plain steps; the batched steps where they run on a thread of their
        # own), and by a change of the adapters' hooks
        self._stepping = threading.RLock()
        self._plain_thread_started = threading.Lock()
        self._own_thread = False
        self.shared = False  # whether the plain steps run in the batching loop (then a lone request starts plain)
        self.log = log
        self._grammar_tokenizer = None  # llguidance's view of the tokenizer, made at the first response_format
        self.lone: Choice | None = None  # the batchable choice on the plain path, while it has the machine alone
        self.batcher = None  # set before its loop starts: a loop that dies at once must find itself here
        if batching:
            self._start_batching(log)
        if not self.shared:
            self._start_plain_thread()

    # -- submitting ------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], sampling: Sampling, siblings: int = 0,
               adapter: Adapter | None = None) -> Choice:
        """Start one choice (on the event loop); its events arrive on choice.out. `siblings`: the other
        choices of its request, submitted with it (a choice with company is never lone). `adapter`: one of
        `adapters` (None: the base model)."""
        choice = Choice(prompt_ids, sampling, TextStream(self.tokenizer_of(adapter), sampling.stop),
                        asyncio.get_running_loop(), adapter=adapter,
                        eos_ids=frozenset(self.eos) | (adapter.eos if adapter is not None else frozenset()))
        alone = self.shared and not self.open and not siblings
        self.open[choice.id] = choice
        self.metrics.running.inc()
        if self.batcher is not None and sampling.batchable and not alone and (adapter is None or self._routable):
            if self.lone is not None and (self.lone.adapter is None or self._routable):
                self.lone.hand_over, self.lone = True, None
            self._submit_batched(choice)
        else:
            if alone and sampling.batchable:
                self.lone = choice
            self._queue_plain(choice)
        return choice

    # -- adapters: served beside the base model, chosen per request (engine/server/adapters.py) ---------------

    def tokenizer_of(self, adapter: Adapter | None):
        """The tokenizer a request for this adapter is read and written with: the adapter's own (a chat template
        saved with it), else the base model's."""
        return adapter.tokenizer if adapter is not None and adapter.tokenizer is not None else self.tokenizer

    def load_adapter(self, name: str, path: str) -> Adapter:
        """Serve an adapter under `name`, from the next forward on; requests already running are not touched. Reads
        its files: not on the event loop. Raises AdapterError."""
        from transformers import AutoTokenizer

        if not self.lora:
            raise AdapterError("this server was started without adapters; start it with --enable-lora to load them")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is served already: unload it first, or choose another name")
        adapter = read_adapter(name, path, self.model, self.max_lora_rank)
        if (Path(path) / "tokenizer_config.json").is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except Exception as exc:  # noqa: BLE001 - a damaged tokenizer file, in the tokenizer's words
                raise AdapterError(f"{name}: its tokenizer cannot be read ({type(exc).__name__}: {exc})") from None
            if len(tokenizer) > self.vocab_size:
                raise AdapterError(f"{name}: its tokenizer has {len(tokenizer)} tokens, more than this model's "
                                   f"{self.vocab_size} (an adapter of another base model?)")
            adapter.tokenizer = tokenizer
            if tokenizer.eos_token_id is not None:
                adapter.eos = frozenset([tokenizer.eos_token_id])
        self._no_prefix_sharing()  # before any request can name it: a prefix is matched when a batch is prepared
        with self._adapters_changing:
            if name in self.adapters:  # another load of the same name, meanwhile
                raise AdapterError(f"an adapter named {name!r} is served already: unload it first, or choose another "
                                   "name")
            self.adapters[name] = adapter
            self._stack_stale = True
        self.log(f"adapter {name!r} loaded from {path} (rank {adapter.rank}, {len(adapter.layers)} layers)")
        return adapter

    def unload_adapter(self, name: str) -> Adapter:
        """Stop serving an adapter: new requests for it are refused; those running finish with it."""
        with self._adapters_changing:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise KeyError(name)
            self._stack_stale = True
        users = sum(1 for c in list(self.open.values()) if c.adapter is adapter)
        self.log(f"adapter {name!r} unloaded" + (f"; {users} requests using it finish with it" if users else ""))
        return adapter

    def _stack_with(self, adapters) -> Stack:
        """The stack, made anew first if it lacks one of these adapters or holds one nobody needs any more. On the
        thread that runs the model, holding `_stepping`: hooks are added only between two forwards."""
        stack = self._stack
        if not self._stack_stale and all(a.key in stack.adapters for a in adapters if a is not None):
            return stack
        self._stack_stale = False
        needed = {a.key: a for a in list(self.adapters.values())}  # (copied at once: loads and unloads go on)
        for choice in list(self.open.values()):
            if choice.adapter is not None:
                needed.setdefault(choice.adapter.key, choice.adapter)
        for adapter in adapters:  # a choice ended meanwhile still runs this forward
            if adapter is not None:
                needed.setdefault(adapter.key, adapter)
        if needed.keys() != stack.adapters.keys():
            stack = Stack.of(list(needed.values()))
            self._hooks.cover(stack)
            if stack.adapters:  # again, on the model's thread: at start the batching cache may not have existed yet
                self._no_prefix_sharing()
            self._stack = stack
        return stack

    def _no_prefix_sharing(self) -> None:
        """The batching cache shares blocks between requests whose prompts begin alike; an adapter computes other
        keys and values for the same tokens, so from the first adapter on nothing is shared (never again: a block
        freed while sharing was off may hold an adapter's values under a base prompt's hash). Flags read by the
        model's thread as it prepares a batch; a base request matched against base blocks meanwhile is right."""
        manager = self.batcher
        if manager is None:
            return
        manager.continuous_batching_config.allow_block_sharing = False  # a cache made after this
        cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
        if cache is not None:
            cache.allow_block_sharing = cache.use_prefix_sharing = False

    def _batched_routing(self, manager):
        """Whose each token of the batch about to run is, from the requests the batching step prepared; None for a
        batch of the base model only. Unreadable (another transformers): adapters go to the plain path from now on,
        and the adapter requests of this batch fail rather than being answered by the base model."""
        try:
            ios = manager.batch_processor.inputs_and_outputs
            if hasattr(ios, "io_pairs"):  # asynchronous batching: the pair being prepared
                ios = ios.io_pairs[ios.current_pair].host_io
            batch = [(f.state.request_id.split("__child#")[0], f.query_length) for f in ios.requests_in_batch]
        except AttributeError as exc:
            if self._routable:
                self._routable = False
                self.log(f"continuous batching: its batches cannot be read here ({exc}); requests for adapters run on "
                         "the plain path")
            for choice in list(self.open.values()):
                if choice.adapter is not None and choice.batch is manager:
                    choice.cancelled.set()
                    self.fail(choice, "this server's batching cannot apply adapters; send the request again")
            return None
        adapters = [getattr(self.open.get(request_id), "adapter", None) for request_id, _ in batch]
        if not any(adapters):
            return None
        stack = self._stack_with(adapters)
        keys = [a.key if a is not None else None for a in adapters]
        return routing(stack, [(key, n) for key, (_, n) in zip(keys, batch)])

    def _queue_plain(self, choice: Choice) -> None:
        self.metrics.choices.labels(path="plain").inc()
        self.plain_jobs.put(choice)
        manager = self.batcher
        if self.shared and manager is not None:
            manager._wake_up_loop.set()  # its loop runs the plain steps: not a wait for new requests now

    def _join_batch(self, choice: Choice) -> None:
        """A lone choice the plain thread let go of, on to the batch (on the event loop)."""
        if choice.ended:  # a shutdown ended it on the way
            return
        if choice.cancelled.is_set():
            self.end(choice, "abort")
            return
        self._submit_batched(choice)

    def _close(self, choice: Choice) -> bool:
        """Mark it over, once (any thread): False if it was already."""
        with choice.ending:
            if choice.ended:
                return False
            choice.ended = True
        self.metrics.running.dec()
        self.open.pop(choice.id, None)
        if self.lone is choice:
            self.lone = None
        if choice.adapter is not None and self.adapters.get(choice.adapter.name) is not choice.adapter:
            self._stack_stale = True  # maybe the last request of an unloaded adapter: its weights can go
        return True

    def end(self, choice: Choice, finish: str) -> None:
        """A choice is over: what was held back, then its end."""
        if not self._close(choice):
            return
        rest = choice.stream.rest()
        if choice.stream.stopped and finish == "length":
            finish = "stop"  # the last tokens completed a stop string
        if rest or choice.pending_logprobs:
            choice.put(("delta", rest, choice.pending_logprobs))
            choice.pending_logprobs = []
        self.metrics.finished(choice.generated, choice.first, time.perf_counter() - choice.submitted)
        choice.put(("done", finish, choice.generated, choice.first))

    def fail(self, choice: Choice, message: str) -> None:
        if self._close(choice):
            choice.put(("error", message))

    def abort_all(self) -> None:
        """The server stops: every open choice ends now, its stream with a final event."""
        for choice in list(self.open.values()):
            choice.cancel()  # a batched one ends at once; a plain one at its thread's next step
            if choice.on_cancel is None and choice.id not in self.plain_active:
                self.end(choice, "abort")  # still queued for the plain thread

    def _token(self, choice: Choice, token: int, logprobs: dict | None = None, last: bool = False) -> bool:
        """One generated token: its text goes out. False once the choice is over (end of sequence, a stop
        string, its length). `last`: the caller ends it (a grammar completed), whatever its length."""
        if token in choice.eos_ids:
            choice.eos = token  # kept for reading tool calls back (a template may close a turn with it)
            self.end(choice, "stop")
            return False
        if choice.first is None:
            choice.first = time.perf_counter() - choice.submitted
        choice.generated += 1
        self.metrics.token()
        if logprobs is not None:
            choice.pending_logprobs.append(logprobs)
        delta = choice.stream.add(token)
        if delta:
            choice.put(("delta", delta, choice.pending_logprobs))
            choice.pending_logprobs = []
        if choice.stream.stopped:
            self.end(choice, "stop")
            return False
        if choice.generated >= choice.sampling.max_tokens and not last:
            self.end(choice, "length")
            return False
        return True

    # -- tools: the chat template offers them, the response template reads the calls back -----------------

    def response_template(self, tokenizer) -> dict | None:
        """How this model's replies are laid out (content, tool calls), for tokenizer.parse_response: the
        tokenizer's own, else the one transformers knows for the model's family."""
        template = getattr(tokenizer, "response_template", None)
        if template is not None:
            return template
        try:
            from transformers.cli.serving.utils import get_response_template
        except ImportError:
            return None
        return get_response_template(tokenizer, self.model.config)

    def read_tool_calls(self, choice: Choice, tools: list[dict], template: dict,
                        one: bool = False) -> tuple[str, list[dict]]:
        """A finished choice's reply as its content and the tool calls in it (OpenAI's shape); with `one`, the
        first call only (parallel_tool_calls: false)."""
        ids = choice.stream.tokens + ([choice.eos] if choice.eos is not None else [])
        tokenizer = self.tokenizer_of(choice.adapter)
        prefix = tokenizer.decode(choice.prompt_ids)
        offered = {t.get("function", {}).get("name") for t in tools}
        try:
            parsed = tokenizer.parse_response(ids, template, prefix=prefix, tools=tools)
            calls = []
            for i, call in enumerate(parsed.get("tool_calls") or []):
                function = call["function"]
                name, arguments = function["name"], function.get("arguments", {})
                if name not in offered:
                    raise ValueError(f"a call of {name!r}, which was not offered")
                arguments = json.dumps(arguments) if not isinstance(arguments, str) else arguments
                json.loads(arguments)  # what a client will parse: JSON, or no call at all
                calls.append({"id": f"call_{choice.id}_{i}", "type": "function",
                              "function": {"name": name, "arguments": arguments}})
            content = parsed.get("content") or ""
        except Exception:  # noqa: BLE001 - a reply that is no well-formed call (cut by max_tokens, say): its text
            return choice.stream.text, []
        return (content.strip() if calls else choice.stream.text), calls[:1] if one else calls

    # -- response_format: a grammar the reply follows (llguidance), on the plain path -----------------------

    def grammar_for(self, response_format) -> str | None:
        """The grammar for a response_format (off the event loop: a schema can take a while), None for text.
        Raises RequestError for a schema that cannot be followed, or without llguidance."""
        from engine.server.api import RequestError

        if response_format is None or response_format.type == "text":
            return None
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise RequestError("'response_format' needs the llguidance package on the server (pip install "
                               "llguidance)", param="response_format", code="unsupported_parameter") from None
        if self._grammar_tokenizer is None:
            try:
                self._grammar_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                                       eos_token=sorted(self.eos) or None)
            except Exception as exc:  # noqa: BLE001 - a slow tokenizer, say: said, and remembered
                self._grammar_tokenizer = f"this model's tokenizer cannot be followed by a grammar ({exc})"
        if isinstance(self._grammar_tokenizer, str):
            raise RequestError(f"'response_format': {self._grammar_tokenizer}", param="response_format",
                               code="unsupported_parameter")
        param = "response_format"
        if response_format.type == "json_object":
            schema = {"type": "object"}
        else:
            param = "response_format.json_schema.schema"
            schema = (response_format.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise RequestError(f"'{param}' must be a JSON schema (an object)", param=param, code="invalid_value")
        try:  # compact: no whitespace between the parts, so a reply cannot wander off in blanks
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False})
        except ValueError as exc:
            raise RequestError(f"'{param}': cannot be followed: {exc}", param=param, code="invalid_value") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._grammar_tokenizer)  # "" when it is fine
        if problem:
            raise RequestError(f"'{param}': cannot be followed: {problem}", param=param, code="invalid_value")
        return grammar

    # -- batched: transformers' continuous batching -------------------------------------------------------

    def _start_batching(self, log: Callable[[str], None]) -> None:
        """`batcher` becomes the batching manager, its loop started (left None where batching cannot run)."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        if not hasattr(self.model, "init_continuous_batching"):
            log("continuous batching: this model has none; every request runs on the plain path")
            return
        # Per-request temperature and top-p exist only where the shared config creates their warpers: values
        # other than the neutral ones, always overridden by each request's own. No top-k: a sort of the whole
        # vocabulary at every step, for nothing.
        shared = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.5, top_k=0,
                                  max_new_tokens=self.context, eos_token_id=sorted(self.eos) or -1)
        settings: dict = {"per_request_processors": True}
        if self.lora:  # a captured graph would replay one batch's adapters for every batch; hooks need eager steps
            settings |= {"use_cuda_graph": False, "use_async_batching": False}
        if self.device == "cpu":  # sized for the requests it serves at once, not most of the machine's memory
            per_request = math.ceil(min(self.context, CPU_CACHE_TOKENS_PER_REQUEST) / PAGE_TOKENS)
            settings["num_blocks"] = self.max_concurrent * per_request + math.ceil(self.context / PAGE_TOKENS)
        try:
            attention = self.model.config._attn_implementation
            manager = self.model.init_continuous_batching(
                generation_config=shared, continuous_batching_config=ContinuousBatchingConfig(**settings))
            if str(self.model.config._attn_implementation).startswith("paged"):
                # it switched the model to paged attention, with which the plain path's forward gets no causal
                # mask: exact answers first
                manager.stop(block=False)
                self.model.set_attn_implementation(attention)
                log(f"continuous batching: this model's attention ({attention}) has no batching version here; every "
                    "request runs on the plain path")
                return
            self.shared = self._share_loop(manager)
            if self.lora:
                self._route_batches(manager)
            log(f"continuous batching on {self.device}" + (f", a KV cache of {settings['num_blocks']} blocks of "
                                                           f"{PAGE_TOKENS} tokens" if "num_blocks" in settings else ""))
            self.batcher = manager
            manager.start()  # its loop may die at once (no room for its cache): _batching_ended hands back
        except Exception as exc:  # noqa: BLE001 - an architecture it cannot page: the plain path serves all
            self.batcher, self.shared = None, False
            log(f"continuous batching could not start ({type(exc).__name__}: {exc}); every request runs on "
                "the plain path")

    def _submit_batched(self, choice: Choice) -> None:
        s, manager = choice.sampling, self.batcher  # read once: the loop's thread sets it to None if it dies
        if manager is None:
            self._queue_plain(choice)
            return
        # Greedy as the one token a vanishing top-p keeps (the likeliest: the warper keeps at least one), where a
        # tiny temperature could overflow. Equal to argmax but for exact ties (it keeps the last of them).
        knobs = ({"temperature": 1.0, "top_p": GREEDY_TOP_P} if s.greedy
                 else {"temperature": float(s.temperature), "top_p": float(s.top_p)})
        seen = 0

        def drop() -> None:
            """Out of the batch, and its handler gone (transformers sends a cancelled request nothing more)."""
            manager.cancel_request(choice.id)
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(choice.id, None)

        def on_output(output) -> None:  # on the event loop, for each step's output
            nonlocal seen
            if choice.ended:
                return
            try:
                if output.error is not None:
                    self.fail(choice, f"generation failed: {output.error}")
                    return
                for token in output.generated_tokens[seen:]:
                    seen += 1
                    if not self._token(choice, int(token)):
                        if not output.is_finished():
                            drop()
                        return
                if output.is_finished():
                    self.end(choice, "length")
            except Exception as exc:  # noqa: BLE001 - the other requests of this step still get theirs
                drop()
                self.fail(choice, f"{type(exc).__name__}: {exc}")

        def cancelled() -> None:
            drop()
            self.end(choice, "abort")

        manager.register_result_handler(choice.id, on_output)
        # a choice handed over from the plain path goes on from its last token: what it made joins its prompt
        accepted = manager.add_request(choice.prompt_ids + choice.stream.tokens, request_id=choice.id,
                                       max_new_tokens=s.max_tokens - choice.generated, streaming=True, **knobs)
        if accepted is None:  # its loop died (a CUDA error, say): the plain path serves from now on
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(choice.id, None)
            self._batching_ended(manager)
            self._queue_plain(choice)
            return
        choice.on_cancel, choice.batch = cancelled, manager  # (outputs come on this loop, after this)
        self.metrics.choices.labels(path="handed over" if choice.generated else "batched").inc()

    def _batching_ended(self, manager) -> None:
        """The batching loop is gone (stopped, or died): the plain path has a thread of its own from now on, and
        takes what the loop still held (a request it accepted just before it stopped had no answer coming)."""
        if self.batcher is manager:
            self.batcher, self.shared = None, False
            error = getattr(manager.background_thread_status, "fatal_error", None)
            if error is not None:
                self.log(f"continuous batching stopped ({error}); every request runs on the plain path from now on")
        self._start_plain_thread()
        for choice in list(self.open.values()):
            try:
                choice.loop.call_soon_threadsafe(self._rescue, choice, manager)
            except RuntimeError:  # its event loop is closed: the server is gone
                pass

    def _rescue(self, choice: Choice, manager) -> None:
        """On the event loop: a choice still with a batching loop that ended goes on on the plain path, from its
        last token."""
        if choice.ended or choice.batch is not manager:
            return
        with manager.output_router._lock:
            manager.output_router.result_handlers.pop(choice.id, None)
        choice.batch = choice.on_cancel = None
        self._queue_plain(choice)

    # -- plain: a token each in turn, on our own loop --------------------------------------------------

    def _route_batches(self, manager) -> None:
        """Each batched step runs with its tokens' adapters routed, holding the model (so hooks are never added
        during a forward). Where this transformers' manager has no step of its own to wrap, adapters run on the
        plain path."""
        step = getattr(manager, "_generation_step", None)
        if step is None:
            self._routable = False
            return

        def routed_step() -> None:
            with self._stepping:
                if self._stack_stale:
                    self._stack_with([])  # an unloaded adapter nothing uses any more: its weights go
                route(self._batched_routing(manager) if self.adapters or self._stack.adapters else None)
                try:
                    step()
                finally:
                    route(None)

        manager._generation_step = routed_step

    def _plain_routing(self, choice: Choice, tokens: int):
        if choice.adapter is None:
            return None
        return routing(self._stack_with([choice.adapter]), [(choice.adapter.key, tokens)])

    def _share_loop(self, manager) -> bool:
        """The plain steps into the batching loop: a round of them before each of its steps (and no wait for new
        requests while there are plain ones), so a long plain prefill holds the batch for its length. When the
        loop ends, however (stopped, or died before or after its first step), a thread of ours carries the plain
        ones on. False where this transformers' manager has no such loop (the plain path then has a thread of its
        own, beside the manager's)."""
        body = getattr(manager, "_generation_loop_body", None)
        run = getattr(manager, "_run_generation_loop", None)
        if body is None or run is None or not isinstance(getattr(manager, "_wake_up_loop", None), threading.Event):
            return False

        def shared_body(batch_processor, bootstrapping: bool) -> bool:
            with self.torch.inference_mode():  # the loop runs in its caller's mode: not this (measured slower)
                self._plain_round(wait=False)
            if self._plain or not self.plain_jobs.empty():
                manager._wake_up_loop.set()
            return body(batch_processor, bootstrapping=bootstrapping)

        def run_then_hand_back(*args, **kwargs):
            try:
                return run(*args, **kwargs)
            finally:
                self._batching_ended(manager)

        manager._generation_loop_body = shared_body
        manager._run_generation_loop = run_then_hand_back  # what start() runs on its thread
        return True

    def _start_plain_thread(self) -> None:
        with self._plain_thread_started:
            if not self._own_thread:
                self._own_thread = True
                threading.Thread(target=self._plain_loop, name="plain", daemon=True).start()

    def _plain_loop(self) -> None:
        # Inference mode for the whole thread: the generations interleave, so none may enter or leave it.
        with self.torch.inference_mode():
            while True:
                self._plain_round(wait=True)

    def _plain_round(self, wait: bool) -> None:
        """What is queued joins (waiting for it when `wait` and nothing runs), then a token for each plain choice."""
        first = self.plain_jobs.get() if wait and not self._plain else None  # waited for without the lock
        with self._stepping:
            if self._stack_stale:
                self._stack_with([])  # an unloaded adapter nothing uses any more: its weights go
            self._plain_step_all(first)

    def _plain_step_all(self, first: Choice | None) -> None:
        active = self._plain
        while len(active) < self.max_concurrent:
            if first is not None:
                choice, first = first, None
            else:
                try:
                    choice = self.plain_jobs.get(block=False)
                except queue.Empty:
                    break
            self.plain_active.add(choice.id)
            active.append((choice, self._plain_steps(choice)))
        for entry in list(active):
            choice, steps = entry
            try:
                next(steps)
            except StopIteration:
                active.remove(entry)
                self.plain_active.discard(choice.id)
            except Exception as exc:  # noqa: BLE001 - a failed generation ends its request, not the server
                self.fail(choice, f"{type(exc).__name__}: {exc}")
                active.remove(entry)
                self.plain_active.discard(choice.id)

    def _plain_steps(self, choice: Choice) -> Iterator[None]:
        """One choice, yielding after each token so the others take theirs."""
        torch, s = self.torch, choice.sampling
        generator = torch.Generator(device=self.device)
        generator.manual_seed((s.seed % 2**64) if s.seed is not None else int.from_bytes(os.urandom(8), "little"))
        counts = torch.zeros(self.vocab_size, device=self.device)
        bias = torch.zeros(self.vocab_size, device=self.device)
        if s.logit_bias:
            bias[list(s.logit_bias)] = torch.tensor(list(s.logit_bias.values()), device=self.device)
        matcher = bitmask = None
        if s.grammar is not None:
            import llguidance
            import llguidance.torch
            import numpy as np

            matcher = llguidance.LLMatcher(self._grammar_tokenizer, s.grammar, log_level=0)
            bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
            unpack = np.unpackbits
        # from where it is: a choice that comes back from a batch that died has tokens of its own already
        ids, past = torch.tensor([choice.prompt_ids + choice.stream.tokens], device=self.device), None
        while True:
            if choice.cancelled.is_set() or choice.ended:
                self.end(choice, "abort")
                return
            route(self._plain_routing(choice, ids.shape[1]))
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: past})
            past = getattr(out, self.cache_arg)
            logits = out.logits[0, -1].float()
            adjusted = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).float() + bias
            if matcher is not None:  # only the tokens the grammar allows next
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
                # unpacked here rather than with llguidance's own helper, which needs torch.compile (a compiler)
                allowed = unpack(bitmask[0].numpy().view(np.uint8), bitorder="little")[:self.vocab_size]
                if matcher.is_error() or not allowed.any():
                    self.fail(choice, f"the reply cannot follow response_format: {matcher.get_error()}")
                    return
                adjusted = adjusted.masked_fill(torch.from_numpy(allowed == 0).to(adjusted.device), float("-inf"))
            token = self._sample(adjusted, s, generator)
            if matcher is not None:
                if not matcher.consume_token(token) or matcher.is_error():
                    self.fail(choice, f"the reply cannot follow response_format: {matcher.get_error()}")
                    return
                if matcher.is_stopped():  # the JSON is whole: its stop token, or the end of the grammar
                    if token not in choice.eos_ids:
                        self._token(choice, token, self._logprobs(logits, token, s.logprobs)
                                    if s.logprobs is not None else None, last=True)
                    self.end(choice, "stop")
                    return
            logprobs = self._logprobs(logits, token, s.logprobs) if s.logprobs is not None else None
            counts[token] += 1
            if not self._token(choice, token, logprobs):
                return
            if choice.hand_over and self.batcher is not None:  # another came: the batch serves both from now on
                choice.loop.call_soon_threadsafe(self._join_batch, choice)
                return
            ids = torch.tensor([[token]], device=self.device)
            yield

    def _sample(self, logits, s: Sampling, generator) -> int:
        torch = self.torch
        if s.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < s.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _logprobs(self, logits, token: int, alternatives: int) -> dict:
        """The model's own log-probabilities (before temperature, penalties and biases), as vLLM gives them."""
        logp = self.torch.log_softmax(logits, dim=-1)
        entry = self._token_entry(token, float(logp[token]))
        if alternatives:
            values, ids = logp.topk(alternatives)
            entry["top_logprobs"] = [self._token_entry(int(i), float(v)) for v, i in zip(values, ids)]
        else:
            entry["top_logprobs"] = []
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8", "replace"))}

    def shutdown(self) -> None:
        if self.batcher is not None:
            try:
                self.batcher.stop(block=True, timeout=2, hard_stop=True)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
