"""What the server's /metrics reports, in the Prometheus text format (`prometheus_client`).

Each server has its own registry, so several servers in one process (tests, benchmarks) count apart. Token
counts are the target's committed tokens, cancelled generations included.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TAU_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's counters, histograms and gauges (`treeflash_*`), and their exposition."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("treeflash_requests", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"), registry=registry)
        self.request_seconds = Histogram("treeflash_request_duration_seconds",
                                         "Request latency, to the last byte of the response.", ("endpoint",),
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.generations = Counter("treeflash_generations",
                                   "Generations by method and outcome (stop, length, cancelled, error).",
                                   ("method", "outcome"), registry=registry)
        self.generated_tokens = Counter("treeflash_generated_tokens", "Tokens committed by the target, by method.",
                                        ("method",), registry=registry)
        self.prompt_tokens = Counter("treeflash_prompt_tokens", "Prompt tokens of accepted requests.",
                                     registry=registry)
        self.tau = Histogram("treeflash_tau",
                             "tau of each finished generation: mean tokens committed per round, bonus included.",
                             ("method",), buckets=TAU_BUCKETS, registry=registry)
        self.time_to_first_token = Histogram("treeflash_time_to_first_token_seconds",
                                             "From a request's arrival at the engine to its first token.",
                                             ("method",), buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("treeflash_batch_size", "Generations in each batched round (one target pass).",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.queue_length = Gauge("treeflash_queue_length", "Requests waiting for the engine.", registry=registry)
        self.active = Gauge("treeflash_active_generations", "Generations in progress.", registry=registry)

    def render(self, waiting: int, active: int) -> str:
        """The exposition, with the engine's current queue length and active generations."""
        self.queue_length.set(waiting)
        self.active.set(active)
        return generate_latest(self.registry).decode()
