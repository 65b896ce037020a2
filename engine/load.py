"""A deployment's load over the last minutes: requests and tokens per second and time to first token (p50,
p95), from the counters and the histogram each server publishes on /metrics (vLLM's and the built-in one's
names), read every few seconds. The Prometheus text is parsed by prometheus_client, as Prometheus would."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# What each server calls them (the built-in server's engine/server/metrics.py; vLLM's docs, "Metrics").
REQUEST_COUNTERS = ("modeldeck_requests_total", "vllm:request_success_total")
TOKEN_COUNTERS = ("modeldeck_generation_tokens_total", "vllm:generation_tokens_total")
TTFT_BUCKETS = ("modeldeck_time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_bucket")

KEEP_S = 600.0  # the history the dashboard keeps of each deployment
TTFT_WINDOW_S = 30.0  # time to first token is read over this much of it: a few seconds hold too few requests


@dataclass(frozen=True)
class ServerLoad:
    """A server's counters at one moment, since it started."""

    requests: int  # answered
    tokens: int  # generated
    ttft: tuple[tuple[float, float], ...] = ()  # the time-to-first-token histogram: (upper bound, count ≤ it)


def parse_load(metrics_text: str) -> ServerLoad:
    """Sum the request and generated-token counters and the TTFT buckets, whatever their labels (status,
    model, ...). Raises ValueError for text that is not Prometheus's."""
    from prometheus_client.parser import text_string_to_metric_families

    requests = tokens = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in REQUEST_COUNTERS:
                requests += sample.value
            elif sample.name in TOKEN_COUNTERS:
                tokens += sample.value
            elif sample.name in TTFT_BUCKETS and "le" in sample.labels:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return ServerLoad(int(requests), int(tokens), tuple(sorted(buckets.items())))


def read_load(endpoint: str, timeout: float = 1.0, client=None) -> ServerLoad | None:
    """The server's counters from its /metrics, or None when it does not answer with them. `client`: an
    httpx client kept between readings (a new one each time costs more than the reading: its TLS set-up)."""
    import httpx2 as httpx

    try:
        url = endpoint.removesuffix("/v1") + "/metrics"
        response = client.get(url, timeout=timeout) if client is not None else httpx.get(url, timeout=timeout)
        return parse_load(response.text) if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated inside its bucket as Prometheus's
    histogram_quantile does; None when it counts nothing. Past the last finite bound: that bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return bound if count == below else lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _since(now: ServerLoad, then: ServerLoad) -> tuple[tuple[float, float], ...]:
    earlier = dict(then.ttft)
    return tuple((bound, count - earlier.get(bound, 0.0)) for bound, count in now.ttft)


@dataclass(frozen=True)
class LoadPoint:
    at: float  # time.monotonic() of the reading
    requests_per_s: float
    tokens_per_s: float
    ttft_p50: float | None  # seconds, over the last TTFT_WINDOW_S; None: no request had a first token then
    ttft_p95: float | None


@dataclass
class LoadHistory:
    """One deployment's load: a point per reading of its counters, over the last KEEP_S."""

    keep_s: float = KEEP_S
    ttft_window_s: float = TTFT_WINDOW_S
    readings: deque = field(default_factory=deque)  # (at, ServerLoad)
    points: deque = field(default_factory=deque)  # LoadPoint

    @property
    def last(self) -> ServerLoad | None:
        return self.readings[-1][1] if self.readings else None

    def add(self, load: ServerLoad, at: float) -> LoadPoint | None:
        """A new reading; returns the point it makes (None for the first, or the first after a restart, or
        one older than the last: a slow reading that came late)."""
        if self.readings:
            last_at, last = self.readings[-1]
            if at <= last_at:
                return None
            if load.requests < last.requests or load.tokens < last.tokens:  # the server started again
                self.readings.clear()
                self.points.clear()
        point = None
        if self.readings:
            before_at, before = self.readings[-1]
            span = at - before_at
            window = next(((t, r) for t, r in self.readings if t >= at - self.ttft_window_s), self.readings[-1])
            recent = _since(load, window[1])
            point = LoadPoint(at, (load.requests - before.requests) / span, (load.tokens - before.tokens) / span,
                              quantile(0.5, recent), quantile(0.95, recent))
            self.points.append(point)
        self.readings.append((at, load))
        while self.readings and self.readings[0][0] < at - self.keep_s:
            self.readings.popleft()
        while self.points and self.points[0].at < at - self.keep_s:
            self.points.popleft()
        return point

    def series(self, name: str) -> list[float]:
        """One of the points' values over time ("tokens_per_s", "requests_per_s", "ttft_p95"...); a missing
        TTFT reads as 0 (no request then)."""
        return [getattr(p, name) or 0.0 for p in self.points]
