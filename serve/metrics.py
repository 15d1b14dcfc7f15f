"""Prometheus metrics of the guard, in a registry of its own (so two guards in one process do not collide).

Concept labels appear only on counters of flagged concepts: a concept index may hold 100,000 concepts, and a label
per concept on every series would explode the scrape. The labels are stable concept ids (``c<row>`` of the export's
index) unless the operator asks for names: the scrape is an operator view, but ids keep names out of dashboards.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SCORE_BUCKETS = tuple(round(-0.2 + 0.1 * i, 1) for i in range(13))  # cosine -0.2 .. 1.0


class GuardMetrics:
    """Counters and histograms the proxy updates; ``render()`` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "atu_guard_requests_total",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.flagged = Counter(
            "atu_guard_flagged_total", "Completions in which a concept crossed its threshold.", ["concept"], registry=r
        )
        self.prompt_flagged = Counter(
            "atu_guard_prompt_flagged_total",
            "Prompts in which a concept crossed its threshold.",
            ["concept"],
            registry=r,
        )
        self.actions = Counter(
            "atu_guard_actions_total", "What the policy did with a scored exchange.", ["action"], registry=r
        )
        self.upstream_errors = Counter(
            "atu_guard_upstream_errors_total", "Upstream vLLM failures, by kind.", ["kind"], registry=r
        )
        self.rejected = Counter(
            "atu_guard_rejected_total",
            "Requests refused with a 4xx (bad input, key, limits), by status.",
            ["status"],
            registry=r,
        )
        self.scoring_errors = Counter("atu_guard_scoring_errors_total", "Scoring failures.", registry=r)
        self.audit_records = Counter("atu_guard_audit_records_total", "Audit records committed.", registry=r)
        self.capture = Counter(
            "atu_guard_capture_sequences_total",
            "Capture backend: sequences scored from states recorded in vLLM (captured) or re-computed (fallback).",
            ["result"],
            registry=r,
        )
        self.scoring_seconds = Histogram(
            "atu_guard_scoring_seconds",
            "Time to score one exchange (queue + batch).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "atu_guard_upstream_seconds",
            "Time the upstream took to answer (to the last byte).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.max_score = Histogram(
            "atu_guard_max_score", "Highest concept score of each completion.", buckets=_SCORE_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "atu_guard_scoring_batch_size",
            "Exchanges scored per model forward.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.in_flight = Gauge("atu_guard_in_flight", "Requests being handled.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
