"""Prometheus metrics of one service instance (its own registry, so several apps can live in
one process, as in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "defectvlm_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "defectvlm_request_seconds",
            "Time from request to answer, by route.",
            ["route"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "defectvlm_batch_size",
            "Images scored per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge("defectvlm_queue_depth", "Requests waiting for a batch.", registry=self.registry)
        self.model_info = Gauge(
            "defectvlm_model_info", "1 for the model version being served.", ["version"], registry=self.registry
        )

    def model_loaded(self, version: str, previous: str | None) -> None:
        if previous is not None and previous != version:
            self.model_info.remove(previous)
        self.model_info.labels(version=version).set(1)
