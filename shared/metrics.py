"""Prometheus metrics: per-RPC counts and latencies, served in the text format."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "najimi_rpc_requests_total",
    "RPCs handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "najimi_rpc_duration_seconds",
    "Time to handle an RPC (to the last message of a stream).",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AUTH_DENIALS = Counter(
    "najimi_auth_denials_total", "Calls refused by authentication or authorisation.", ["service", "code"]
)


def observe_rpc(service: str, method: str, code: str, seconds: float) -> None:
    RPC_REQUESTS.labels(service, method, code).inc()
    RPC_LATENCY.labels(service, method).observe(seconds)


def serve_metrics(host: str, port: int) -> None:
    """Serves /metrics on host:port from a background thread (port 0 disables it)."""
    if port:
        start_http_server(port, addr=host)
