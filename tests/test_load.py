"""Load history: a server's counters and time-to-first-token histogram, read from its real /metrics under a
bounded load, turned into requests/s, tokens/s and TTFT p50/p95 points that add back up to what was sent."""

from __future__ import annotations

import math
import threading
import time

import pytest

from engine.load import LoadHistory, ServerLoad, parse_load, quantile, read_load
from tests.test_server import chat, model_dir, server  # noqa: F401  (the fixtures: one real server)

OURS = ('# HELP modeldeck_requests_total x\n# TYPE modeldeck_requests_total counter\n'
        'modeldeck_requests_total{status="200"} 7\nmodeldeck_requests_total{status="400"} 2\n'
        '# TYPE modeldeck_generation_tokens_total counter\nmodeldeck_generation_tokens_total 350\n'
        '# TYPE modeldeck_time_to_first_token_seconds histogram\n'
        'modeldeck_time_to_first_token_seconds_bucket{le="0.1"} 5\n'
        'modeldeck_time_to_first_token_seconds_bucket{le="0.2"} 10\n'
        'modeldeck_time_to_first_token_seconds_bucket{le="+Inf"} 10\n'
        'modeldeck_time_to_first_token_seconds_count 10\n')
VLLM = ('vllm:request_success_total{finished_reason="stop",model_name="m"} 3.0\n'
        'vllm:request_success_total{finished_reason="length",model_name="m"} 1.0\n'
        'vllm:generation_tokens_total{model_name="m"} 1234.0\n'
        'vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 4.0\n'
        'vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 4.0\n')


def test_either_servers_metrics_are_read_whatever_their_labels():
    ours, vllm = parse_load(OURS), parse_load(VLLM)
    assert (ours.requests, ours.tokens) == (9, 350)
    assert ours.ttft == ((0.1, 5.0), (0.2, 10.0), (math.inf, 10.0))
    assert (vllm.requests, vllm.tokens, vllm.ttft) == (4, 1234, ((0.5, 4.0), (math.inf, 4.0)))
    with pytest.raises(ValueError):
        parse_load("garbage that is no metric {")
    assert parse_load("# only comments\n") == ServerLoad(0, 0)


def test_a_server_that_does_not_answer_has_no_load():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert read_load(f"http://127.0.0.1:{port}/v1", timeout=0.5) is None


def test_quantiles_interpolate_inside_the_bucket_as_prometheus_does():
    buckets = ((0.1, 5.0), (0.2, 10.0), (math.inf, 10.0))
    assert quantile(0.5, buckets) == pytest.approx(0.1)  # rank 5: the top of the first bucket
    assert quantile(0.95, buckets) == pytest.approx(0.1 + 0.1 * (9.5 - 5) / 5)
    assert quantile(0.25, buckets) == pytest.approx(0.05)
    assert quantile(0.99, ((0.5, 1.0), (math.inf, 10.0))) == 0.5  # past the last bound: that bound
    assert quantile(0.5, ((0.1, 0.0), (math.inf, 0.0))) is None and quantile(0.5, ()) is None


def load(requests, tokens, fast=0.0, slow=0.0):
    return ServerLoad(requests, tokens, ((0.1, fast), (1.0, fast + slow), (math.inf, fast + slow)))


def test_history_makes_rates_between_readings_and_ttft_over_its_window():
    history = LoadHistory(keep_s=100, ttft_window_s=10)
    assert history.add(load(0, 0), 0.0) is None  # one reading makes no rate
    first = history.add(load(4, 200, fast=4), 2.0)
    assert (first.requests_per_s, first.tokens_per_s) == (2.0, 100.0) and first.ttft_p95 <= 0.1
    history.add(load(6, 300, fast=4, slow=2), 4.0)
    idle = history.add(load(6, 300, fast=4, slow=2), 20.0)  # 16 s of nothing: the slow ones left the window
    assert (idle.requests_per_s, idle.tokens_per_s, idle.ttft_p50) == (0.0, 0.0, None)
    assert history.series("requests_per_s") == [2.0, 1.0, 0.0] and history.series("ttft_p95")[-1] == 0.0


def test_history_starts_again_when_the_server_does_and_forgets_past_its_span():
    history = LoadHistory(keep_s=10)
    history.add(load(10, 500), 0.0)
    history.add(load(12, 600), 2.0)
    assert history.add(load(1, 20), 4.0) is None and not history.points  # counters went back: restarted
    for at in range(6, 30, 2):
        history.add(load(at, at * 10), float(at))
    assert history.points[0].at >= 18.0 and history.last == load(28, 280)
    assert history.add(load(20, 200), 27.0) is None and history.last == load(28, 280)  # late: not a restart


def test_a_real_servers_history_adds_up_to_the_requests_sent(server):  # noqa: F811
    """Bounded load on the real built-in server, read every 0.3 s as the dashboard reads it: the points'
    requests and tokens, multiplied back by their spans, are exactly what the clients sent and got."""
    history = LoadHistory()
    endpoint = server.url + "/v1"
    start_load = read_load(endpoint)
    history.add(start_load, time.monotonic())
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            if (reading := read_load(endpoint)) is not None:
                history.add(reading, time.monotonic())
            time.sleep(0.3)

    poller = threading.Thread(target=poll)
    poller.start()
    sent, generated, slowest = 6, 0, 0.0
    try:
        for seed in range(sent):
            began = time.monotonic()
            reply = chat(server, max_tokens=5, seed=seed)
            slowest = max(slowest, time.monotonic() - began)
            generated += reply.usage.completion_tokens
            server.client().models.list()  # a listing is not load
        time.sleep(0.7)  # a reading after the last reply
    finally:
        stop.set()
        poller.join()
    points, times = list(history.points), [history.readings[0][0]] + [p.at for p in history.points]
    assert len(points) >= 3
    spans = [b - a for a, b in zip(times, times[1:])]
    assert round(sum(p.requests_per_s * s for p, s in zip(points, spans))) == sent
    assert round(sum(p.tokens_per_s * s for p, s in zip(points, spans))) == generated
    from engine.server.metrics import TTFT_BUCKETS

    ceiling = min(b for b in TTFT_BUCKETS if b >= slowest)  # a first token comes before its reply ends
    answered = [p for p in points if p.ttft_p95 is not None]
    assert answered and all(0 < p.ttft_p50 <= p.ttft_p95 <= ceiling for p in answered)
