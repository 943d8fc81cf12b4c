"""Per-reply serving metrics: a one-line summary for `/admin model status`, and Prometheus.

Every engine ends a reply through `EngineRequest.finish`, which calls its engine's `finish_hooks`;
the exporter registers on the engine it watches (a reload hands the hooks on), so local and OpenAI-compatible engines report the same figures
without the chat code knowing. The exporter is optional (METRICS_PORT=0 turns it off) and cheap:
a few histogram observations per reply, served from prometheus-client's own thread.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bot.engine import Engine, ReplyStats

log = logging.getLogger(__name__)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180)
_RATES = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 250, 500, 1000)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 3072, 4096, 8192, 16384, 32768)


def summary(recent: Iterable[ReplyStats]) -> str:
    """Medians over recent replies, e.g. for `/admin model status`."""
    done = [s for s in recent if s.finish_reason and s.finish_reason != "error"]
    if not done:
        return "no replies yet"
    ttft = [t for s in done if (t := s.time_to_first_token) is not None]
    tps = [s.tokens_per_s for s in done if s.tokens_per_s]
    prompt = sum(s.prompt_tokens for s in done)
    reused = sum(s.reused_tokens for s in done)
    parts = [
        f"last {len(done)} replies (medians): queue wait {statistics.median(s.queue_wait for s in done):.2f}s",
        f"first token {statistics.median(ttft):.2f}s" if ttft else "first token -",
        f"{statistics.median(tps):.1f} tokens/s" if tps else "- tokens/s",
        f"prompt {statistics.median(s.prompt_tokens for s in done):.0f} tokens",
        f"{100 * reused / prompt:.0f}% of prompt tokens from cache" if prompt else "",
    ]
    return ", ".join(p for p in parts if p)


@dataclass
class Metrics:
    """Prometheus collectors for replies, in their own registry (tests can run several)."""

    registry: Any = None
    _server: Any = field(default=None, repr=False)
    _engine: Callable[[], Engine | None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = self.registry or CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(
            "hermes_queue_wait_seconds",
            "Time a reply waited before generation began",
            buckets=_SECONDS,
            registry=r,
        )
        self.ttft = Histogram(
            "hermes_time_to_first_token_seconds",
            "From request to the first streamed text",
            buckets=_SECONDS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "hermes_tokens_per_second",
            "Generated tokens per second of each reply",
            buckets=_RATES,
            registry=r,
        )
        self.prompt_tokens = Histogram(  # its _sum is the total of prompt tokens
            "hermes_prompt_tokens", "Prompt length of each reply", buckets=_TOKENS, registry=r
        )
        self.reused_tokens = Counter(
            "hermes_reused_prompt_tokens", "Prompt tokens served from a cached prefix", registry=r
        )
        self.generated_tokens = Counter("hermes_generated_tokens", "Tokens generated", registry=r)
        self.replies = Counter(
            "hermes_replies", "Replies ended, by reason", ["finish_reason"], registry=r
        )
        self.queue_length = Gauge(
            "hermes_engine_queue_length", "Requests waiting for the engine", registry=r
        )

    def observe(self, s: ReplyStats) -> None:
        """Record one finished reply (called from `EngineRequest.finish`, any thread)."""
        self.replies.labels(s.finish_reason or "unknown").inc()
        if s.started_at is not None:
            self.queue_wait.observe(s.queue_wait)
        if (t := s.time_to_first_token) is not None:
            self.ttft.observe(t)
        if s.tokens_per_s:
            self.tokens_per_s.observe(s.tokens_per_s)
        if s.prompt_tokens:
            self.prompt_tokens.observe(s.prompt_tokens)
        self.reused_tokens.inc(s.reused_tokens)
        self.generated_tokens.inc(s.new_tokens)

    def bind(self, engine: Callable[[], Engine | None]) -> None:
        """Watch `engine()`: its replies feed the histograms (once started), and its queue
        length is read from whichever engine is current at scrape time."""
        self._engine = engine

        def length() -> float:
            current = engine()
            return float(current.queue_length) if current is not None else 0.0

        self.queue_length.set_function(length)

    def start(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on `port` and start observing replies."""
        from prometheus_client import start_http_server

        self._server = start_http_server(port, addr=addr, registry=self.registry)
        if self._engine is not None and (engine := self._engine()) is not None:
            engine.finish_hooks.append(self.observe)
        log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)

    def stop(self) -> None:
        engine = self._engine() if self._engine is not None else None
        if engine is not None and self.observe in engine.finish_hooks:
            engine.finish_hooks.remove(self.observe)
        if isinstance(self._server, tuple):  # prometheus-client >= 0.17: (server, thread)
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(5)
        self._server = None


def setup(settings: Any, engine: Callable[[], Engine | None] | None = None) -> Metrics | None:
    """Start the exporter when METRICS_PORT > 0; None (and no cost) otherwise."""
    if settings.metrics_port <= 0:
        return None
    try:
        metrics = Metrics()
    except ImportError:
        log.error("METRICS_PORT is set but prometheus-client is not installed; metrics are off")
        return None
    if engine is not None:
        metrics.bind(engine)
    metrics.start(settings.metrics_port)
    return metrics
