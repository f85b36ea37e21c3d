"""The live view's parts without servers: the summaries of recent cycles, one request's
speculative stats, span arithmetic, and the `--no-dashboard` switch."""

from fastapi.testclient import TestClient

from specedge.models import BUNDLED_TARGET, bundled
from specedge.protocol import StatsRequest, union_s
from specedge_gateway.app import create_app
from specedge_gateway.live import LiveStats, RequestStats, quantile
from specedge_gateway.settings import GatewaySettings
from specedge_gateway.timeline import merged


def test_request_stats_count_drafts_server_steps_and_ratios():
    stats = RequestStats()
    for drafted, accepted in [(32, 3), (32, 0), (0, 0), (16, 2)]:
        stats.cycle(drafted, accepted)
    assert stats.as_dict() == {
        "mode": "specedge", "verifications": 4, "drafts": 3, "server_steps": 1, "draft_tokens": 80,
        "accepted_tokens": 5, "acceptance_rate": 0.0625, "mean_accepted_length": round(5 / 3, 4),
        "tokens_per_verification": 2.25, "engine": None, "exact": None, "seed": None}
    assert RequestStats(mode="autoregressive").as_dict()["acceptance_rate"] is None


def test_live_stats_summarize_the_last_minute_only():
    live = LiveStats(horizon_s=60)
    live.cycle(now=0.0, tokens=9, drafted=32, accepted=8)  # too old at now=100
    for t, accepted in [(95.0, 2), (96.0, 3), (97.0, 3)]:
        live.cycle(now=t, tokens=accepted + 1, drafted=8, accepted=accepted)
    live.cycle(now=98.0, tokens=1, drafted=0, accepted=0)  # a server step
    live.first_token(95.0, 0.2)
    for v in (0.01, 0.02, 0.03):
        live.inter_token(97.0, v)
    s = live.summary(now=100.0)
    assert s["acceptance"]["histogram"] == [0, 0, 1, 2]
    assert s["acceptance"]["cycles"] == 4 and s["acceptance"]["server_steps"] == 1
    assert s["acceptance"]["acceptance_rate"] == 8 / 24
    assert s["throughput"]["tokens"] == 12 and s["throughput"]["tokens_per_s_10s"] == 1.2
    assert sum(s["throughput"]["series"]) * s["throughput"]["bin_s"] == 12
    assert s["latency_ms"]["ttft"] == {"p50": 200.0, "p95": 200.0, "n": 1}
    assert s["latency_ms"]["itl"]["p50"] == 20.0 and s["latency_ms"]["itl_points"][0] == [-3.0, 10.0]


def test_quantile_and_span_arithmetic():
    assert quantile([], 0.5) is None and quantile([3, 1, 2], 0.5) == 2 and quantile([1, 2, 3, 4], 0.95) == 4
    assert merged([[2.0, 3.0], [0.0, 1.0], [1.0005, 1.5]], gap=0.001) == [[0.0, 1.5], [2.0, 3.0]]
    assert union_s([[0.0, 1.0], [0.5, 2.0], [3.0, 3.5]]) == 2.5


def test_stats_request_window_is_on_the_repliers_clock():
    assert StatsRequest(window_s=5).cutoff(now=100.0) == 95.0
    assert StatsRequest(since=97.0, window_s=5).cutoff(now=100.0) == 97.0
    assert StatsRequest(since=3.0).cutoff(now=100.0) == 3.0


def test_dashboard_is_served_from_the_package_and_can_be_switched_off():
    settings = {"tokenizer": bundled(BUNDLED_TARGET), "require_api_key": True}
    client = TestClient(create_app(GatewaySettings(**settings)))  # no lifespan: the page needs no bus
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and "http" not in page.text.replace("http-equiv", "")  # nothing fetched from outside
    off = TestClient(create_app(GatewaySettings(**settings, dashboard=False)))
    assert off.get("/dashboard").status_code == 404 and off.get("/dashboard/data").status_code == 404
