"""The per-RPC figures: what a scrape of /metrics shows after some calls."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from shared.metrics import RpcMetrics


def scrape(metrics: RpcMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(metrics)
    return generate_latest(registry).decode()


def test_counts_by_code_and_a_cumulative_histogram_by_method() -> None:
    metrics = RpcMetrics()
    check = metrics.stats("consent", "CheckConsent")
    assert metrics.stats("consent", "CheckConsent") is check  # one set of figures per method
    for code, seconds in (("OK", 0.0004), ("OK", 0.0005), ("OK", 0.003), ("NOT_FOUND", 20.0)):
        check.observe(code, seconds)
    metrics.stats("profile", "GetCustomer").observe("OK", 0.01)

    text = scrape(metrics)

    assert 'najimi_rpc_requests_total{code="OK",method="CheckConsent",service="consent"} 3.0' in text
    assert 'najimi_rpc_requests_total{code="NOT_FOUND",method="CheckConsent",service="consent"} 1.0' in text
    assert 'najimi_rpc_requests_total{code="OK",method="GetCustomer",service="profile"} 1.0' in text
    lines = set(text.splitlines())
    # A bucket counts the calls that took at most its bound: 0.0005 itself falls in le="0.0005".
    for bound, count in (("0.0005", 2), ("0.001", 2), ("0.005", 3), ("10.0", 3), ("+Inf", 4)):
        assert (
            f'najimi_rpc_duration_seconds_bucket{{le="{bound}",method="CheckConsent",service="consent"}} {count}.0'
            in lines
        )
    assert 'najimi_rpc_duration_seconds_count{method="CheckConsent",service="consent"} 4.0' in lines
    assert 'najimi_rpc_duration_seconds_sum{method="CheckConsent",service="consent"} 20.0039' in lines
    assert 'najimi_rpc_duration_seconds_bucket{le="0.01",method="GetCustomer",service="profile"} 1.0' in lines
