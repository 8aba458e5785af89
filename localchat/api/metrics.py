"""`GET /metrics`: the engine's KV figures and request latencies in Prometheus' text format.

Names: vLLM's where vLLM has one (`kv_cache_usage_perc`, `prefix_cache_queries`/`prefix_cache_hits`,
`num_requests_running`/`num_requests_waiting`, `num_preemptions`, `time_to_first_token_seconds`,
`inter_token_latency_seconds`, `e2e_request_latency_seconds`, `prompt_tokens`,
`generation_tokens`, `request_success`), design.md's for the rest (`blocks_used`, `blocks_cached`,
`blocks_free`, `blocks_total`, `kv_utilization`, `sharing_savings`, `cow_copies`), all behind the
prefix `localchat:` where vLLM writes `vllm:`. A dashboard built for vLLM works after swapping the
prefix, and nothing claims to be vLLM.

KV figures are read from the engine at scrape time (`EngineClient.call`, between steps). Latencies
are observed where every request's outputs arrive, UI and API alike: the engine client's listeners
(localchat/engine/driver.py), so they are what a caller of the client sees, IPC included.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from localchat.engine import EngineClient, RequestOutput, RequestStream
from localchat.engine.sequence import SequenceStatus

log = logging.getLogger(__name__)

PREFIX = "localchat:"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def engine_figures(engine) -> dict:
    """Run in the engine's loop (EngineClient.call): the block figures and the request queues."""
    figures = engine.block_manager.figures().as_dict()
    running = sum(1 for r in engine.requests.values() if any(s.status is SequenceStatus.RUNNING for s in r.seqs))
    figures["num_requests_running"] = running
    figures["num_requests_waiting"] = len(engine.requests) - running
    return figures


class EngineCollector:
    """Reads the engine's figures once per scrape."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def collect(self):
        up = GaugeMetricFamily(PREFIX + "engine_up", "1 while the engine answers, 0 after it stopped")
        try:
            f = self.client.call(engine_figures)
        except Exception as exc:  # noqa: BLE001 - a stopped engine still gets a page that says so
            log.info("engine figures unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        total = f["blocks_total"] or 1

        def gauge(name: str, doc: str, value: float):
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def counter(name: str, doc: str, value: float):
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        yield gauge("kv_cache_usage_perc", "KV-cache usage: blocks in use / all blocks (1 = full)", f["blocks_used"] / total)
        yield counter("prefix_cache_queries", "prompt tokens looked up in the prefix cache", f["prompt_tokens"])
        yield counter("prefix_cache_hits", "prompt tokens the prefix cache served", f["prefix_hit_tokens"])
        yield gauge("num_requests_running", "requests with a sequence in the running batch", f["num_requests_running"])
        yield gauge("num_requests_waiting", "requests waiting for blocks or a batch slot", f["num_requests_waiting"])
        yield counter("num_preemptions", "sequences preempted (blocks freed, recomputed later)", f["preemptions"])
        yield counter("cow_copies", "copy-on-write block copies", f["cow_copies"])
        yield counter("prefix_cache_evictions", "cached blocks evicted to free a block", f["evictions"])
        yield gauge("blocks_total", "KV blocks in the pool", f["blocks_total"])
        yield gauge("blocks_used", "KV blocks held by live sequences (ref count >= 1)", f["blocks_used"])
        yield gauge("blocks_cached", "free KV blocks still holding a reusable prefix", f["blocks_cached"])
        yield gauge("blocks_free", "empty KV blocks", f["blocks_free"])
        yield gauge("block_size", "tokens per KV block", f["block_size"])
        yield gauge("kv_utilization", "tokens stored / slots of the used blocks", f["kv_utilization"])
        yield gauge("sharing_savings", "1 - used blocks / blocks the live sequences would need unshared", f["sharing_savings"])
        yield gauge("num_sequences", "live sequences (samples, beams) holding block tables", f["num_sequences"])


class ApiMetrics:
    """A registry of its own (several servers may share a process in tests) fed by one engine client."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(client))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "time from submit to the first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "time between a request's successive tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "time from submit to the request's end",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens of finished requests", registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "tokens generated", registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "finished requests by finish reason", ["finished_reason"],
                               registry=self.registry)
        self._last_token: dict[str, float] = {}
        self._lock = threading.Lock()
        client.listeners.append(self.observe)

    def close(self) -> None:
        if self.observe in self.client.listeners:
            self.client.listeners.remove(self.observe)

    def observe(self, stream: RequestStream, out: RequestOutput) -> None:
        """One delivered update: a first token (TTFT), later tokens (inter-token), the end (e2e)."""
        new_tokens = max((len(o.delta_token_ids) or (1 if o.delta_text else 0) for o in out.outputs), default=0)
        with self._lock:
            last = self._last_token.get(stream.request_id)
            if new_tokens and stream.last_token_at is not None:
                if last is None:
                    self.ttft.observe(stream.last_token_at - stream.submitted_at)
                else:
                    gap = (stream.last_token_at - last) / new_tokens
                    for _ in range(new_tokens):
                        self.itl.observe(gap)
                self._last_token[stream.request_id] = stream.last_token_at
            if out.finished:
                self._last_token.pop(stream.request_id, None)
        self.generation_tokens.inc(sum(len(o.delta_token_ids) for o in out.outputs))
        if out.finished:
            self.e2e.observe(time.perf_counter() - stream.submitted_at)
            self.prompt_tokens.inc(out.metrics.num_prompt_tokens)
            reasons = {o.finish_reason for o in out.outputs} or {"abort"}
            self.success.labels(finished_reason="abort" if "abort" in reasons else sorted(reasons)[0]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
