"""Prometheus metrics of one server, in its own registry (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """Request counts by status, queue depth, running sequences, token counters, latency histograms,
    and the KV cache's counters under vLLM's names (`vllm:prefix_cache_queries` / `_hits` in tokens,
    `vllm:gpu_prefix_cache_hit_rate`, `vllm:num_preemptions`, `vllm:kv_cache_usage_perc`; speculative
    decoding's `vllm:spec_decode_num_drafts`, `_num_draft_tokens`, `_num_accepted_tokens` and
    `_num_accepted_tokens_per_pos{position}`)."""

    def __init__(self, stats: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        self._stats = stats
        r = self.registry
        self.requests = Counter(
            "llmkit_requests",
            "HTTP API requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llmkit_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("llmkit_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("llmkit_running_sequences", "Sequences in the running batch", registry=r)
        self.ttft = Histogram(
            "llmkit_time_to_first_token_seconds",
            "Time from request to its first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "llmkit_time_per_output_token_seconds",
            "Mean time between output tokens of a request",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        # vLLM's names, so dashboards built for vLLM read them unchanged (the pool sits on the model's device)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)",
                                   registry=r)
        self.prefix_hit_rate = Gauge("vllm:gpu_prefix_cache_hit_rate",
                                     "Prefix cache hit rate: cached / looked-up prompt tokens since start", registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Sequences preempted (KV blocks ran out; recomputed later)",
                                   registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", registry=r)
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Verification steps of a sequence with a draft",
                                   registry=r)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.spec_accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted at each draft position", ["position"], registry=r)
        self._seen: dict[str, float] = {}
        self.e2e = Histogram(
            "llmkit_e2e_request_latency_seconds",
            "Time from request to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def observe_sequence(self, t_start: float, t_first: float | None, t_end: float, n_tokens: int) -> None:
        """Record one finished sequence: TTFT, TPOT (over tokens after the first), end-to-end latency."""
        self.generation_tokens.inc(n_tokens)
        self.e2e.observe(t_end - t_start)
        if t_first is not None:
            self.ttft.observe(t_first - t_start)
            if n_tokens > 1:
                self.tpot.observe((t_end - t_first) / (n_tokens - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, gauges refreshed from the engine."""
        if self._stats is not None:
            s = self._stats()
            self.queue_depth.set(s.get("queued", 0))
            self.running.set(s.get("running", 0))
            per_pos = s.get("spec_decode_num_accepted_tokens_per_pos", [])
            s = {**s, **{f"spec_accepted_pos{i}": n for i, n in enumerate(per_pos)}}
            for counter, key in ((self.prefix_queries, "prefix_cache_queries"), (self.prefix_hits, "prefix_cache_hits"),
                                 (self.preemptions, "preemptions"), (self.spec_drafts, "spec_decode_num_drafts"),
                                 (self.spec_draft_tokens, "spec_decode_num_draft_tokens"),
                                 (self.spec_accepted, "spec_decode_num_accepted_tokens"),
                                 *((self.spec_accepted_per_pos.labels(position=str(i)), f"spec_accepted_pos{i}")
                                   for i in range(len(per_pos)))):
                value = s.get(key, 0)
                counter.inc(max(0, value - self._seen.get(key, 0)))  # engine totals -> counter increments
                self._seen[key] = value
            q = s.get("prefix_cache_queries", 0)
            self.prefix_hit_rate.set(s.get("prefix_cache_hits", 0) / q if q else 0.0)
            total = s.get("total_blocks", 0)
            self.kv_usage.set(1 - s.get("free_blocks", 0) / total if total else 0.0)
        return generate_latest(self.registry)
