"""The inference server's counters: Prometheus metrics (`/metrics`) and Triton's per-model statistics.

Each server owns its own `CollectorRegistry`, so several servers in one process (tests,
benchmarks) never share counters. Embedding stores registered with `add_store` report their
per-tier lookups, hits and hit rates and their lookup latency at scrape time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from luoshu.serving.batching import BatchRecord

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """Triton's statistics of one model version (`GET /v2/models/{m}/stats`)."""

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # runs of the model
    last_inference_ms: int = 0
    batches: dict[int, _Duration] = field(default_factory=dict)  # rows -> runs of that size

    def as_dict(self, name: str, version: str) -> dict:
        zero = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": zero,
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": zero,
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": zero, "compute_infer": d.as_dict(), "compute_output": zero}
                for size, d in sorted(self.batches.items())
            ],
        }


class ServingMetrics:
    """Prometheus metrics and Triton statistics of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        self.requests = Counter(
            "luoshu_inference_requests",
            "Inference requests by outcome",
            (*labels, "protocol", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "luoshu_inference_request_duration_seconds",
            "Inference request latency, arrival to reply",
            (*labels, "protocol"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "luoshu_inference_queue_duration_seconds",
            "Time a request waited in its model's queue",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "luoshu_inference_batch_size",
            "Rows per run of the model",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.executions = Counter(
            "luoshu_inference_executions", "Runs of the model (batches)", labels, registry=self.registry
        )
        self.compute_time = Histogram(
            "luoshu_inference_compute_duration_seconds",
            "Seconds per run of the model",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._stats: dict[tuple[str, str], ModelStats] = {}
        self._children: dict[tuple, tuple] = {}
        self._lock = threading.Lock()
        self._stores: list = []
        self.registry.register(_StoreCollector(self._stores))

    def add_store(self, store) -> None:
        """Reports an `EmbeddingStore`'s tiers at /metrics."""
        self._stores.append(store)

    def stats(self, name: str, version: str) -> ModelStats:
        with self._lock:
            return self._stats.setdefault((name, version), ModelStats())

    def on_batch(self, name: str, version: str, record: BatchRecord) -> None:
        self.executions.labels(name, version).inc()
        self.batch_size.labels(name, version).observe(record.rows)
        self.compute_time.labels(name, version).observe(record.compute_s)
        for q in record.queue_s:
            self.queue_time.labels(name, version).observe(q)
        stats = self.stats(name, version)
        with self._lock:
            stats.execution_count += 1
            stats.compute_infer.add(record.compute_s, record.requests)
            stats.queue.add(sum(record.queue_s), len(record.queue_s))
            stats.batches.setdefault(record.rows, _Duration()).add(record.compute_s)
            if not record.failed:
                stats.inference_count += record.rows

    def on_request(self, name: str, version: str, protocol: str, status: str, seconds: float) -> None:
        key = (name, version, protocol, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds the key each call: keep the children
            children = (self.requests.labels(*key), self.latency.labels(name, version, protocol))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        stats = self.stats(name, version)
        with self._lock:
            (stats.success if status == "success" else stats.fail).add(seconds)
            stats.last_inference_ms = int(time.time() * 1000)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector:
    """Reads the registered embedding stores' counters at scrape time."""

    def __init__(self, stores: list) -> None:
        self._stores = stores

    def collect(self):
        lookups = CounterMetricFamily(
            "luoshu_embedding_lookups", "Unique ids looked up per tier", labels=("table", "tier")
        )
        hits = CounterMetricFamily("luoshu_embedding_hits", "Unique ids found per tier", labels=("table", "tier"))
        rate = GaugeMetricFamily("luoshu_embedding_hit_rate", "Hits / lookups per tier", labels=("table", "tier"))
        latency = SummaryMetricFamily(
            "luoshu_embedding_lookup_duration_seconds",
            "Embedding store lookup calls and their seconds",
            labels=("table",),
        )
        for store in self._stores:
            for table, tiers in store.stats().items():
                for tier, s in tiers["tiers"].items():
                    lookups.add_metric((table, tier), s["lookups"])
                    hits.add_metric((table, tier), s["hits"])
                    rate.add_metric((table, tier), s["hit_rate"])
                latency.add_metric((table,), tiers["lookup_calls"], tiers["lookup_seconds"])
        yield from (lookups, hits, rate, latency)
