"""The built-in server's Prometheus metrics, through prometheus_client (vLLM's choice), on a registry of
its own (one server, one registry; tests run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a few milliseconds (a tiny model on a GPU) to a long queue
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        # the load: completions and chats, and refused requests; not model listings (clients poll them)
        self.requests = Counter("modeldeck_requests", "Requests answered, by HTTP status.", ["status"],
                                registry=registry)
        self.prompt_tokens = Counter("modeldeck_prompt_tokens", "Prompt tokens processed.", registry=registry)
        self.generation_tokens = Counter("modeldeck_generation_tokens", "Tokens generated.", registry=registry)
        self.time_to_first_token = Histogram("modeldeck_time_to_first_token_seconds",
                                             "From a choice's arrival to its first token.", buckets=TTFT_BUCKETS,
                                             registry=registry)
        self.choice_seconds = Histogram("modeldeck_choice_seconds", "From a choice's arrival to its end.",
                                        registry=registry)
        self.choices = Counter("modeldeck_choices", "Choices started, by where they are generated: batched, plain "
                               "(alone, or what batching cannot honour), and handed over (from plain, counted there "
                               "too, to the batch).",
                               ["path"], registry=registry)
        self.running = Gauge("modeldeck_choices_running", "Choices being generated or waiting to be.",
                             registry=registry)
        self.tokens_per_second = Gauge("modeldeck_tokens_per_second",
                                       "Tokens/s of the last choice (choices generated together share the model).",
                                       registry=registry)

    def request(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def token(self) -> None:
        """A token generated: counted now, not when its reply ends (Tok/s is read from the growth)."""
        self.generation_tokens.inc()

    def finished(self, generated: int, ttft: float | None, elapsed: float) -> None:
        """A choice is over (its tokens were counted as they were made)."""
        self.choice_seconds.observe(elapsed)
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        if generated and elapsed > 0:
            self.tokens_per_second.set(generated / elapsed)

    def text(self) -> bytes:
        return generate_latest(self.registry)
