"""A remote server's `/metrics` read into the figures the memory panel can show.

Serving engines name the same things differently; the part after the prefix is what matters:
vLLM and localchat (`vllm:` / `localchat:` + kv_cache_usage_perc, prefix_cache_queries and
prefix_cache_hits, num_requests_running/waiting, num_preemptions, time_to_first_token_seconds),
SGLang (`sglang:` + token_usage, cache_hit_rate, num_running_reqs, num_queue_reqs) and llama.cpp's
server (`llamacpp:` + kv_cache_usage_ratio, requests_processing, requests_deferred). localchat adds
design.md's block figures. What a server does not expose is left out, never guessed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

METRICS_TIMEOUT_S = 3.0
SERVERS = {"vllm": "vLLM", "localchat": "localchat", "sglang": "SGLang", "llamacpp": "llama.cpp"}
# canonical key -> the names (after the prefix) servers use for it
GAUGES = {
    "kv_cache_usage": ("kv_cache_usage_perc", "gpu_cache_usage_perc", "kv_cache_usage_ratio", "token_usage"),
    "prefix_cache_hit_rate": ("gpu_prefix_cache_hit_rate", "cache_hit_rate"),
    "requests_running": ("num_requests_running", "num_running_reqs", "requests_processing"),
    "requests_waiting": ("num_requests_waiting", "num_queue_reqs", "requests_deferred"),
    "preemptions": ("num_preemptions",),
    "blocks_total": ("blocks_total",),
    "blocks_used": ("blocks_used",),
    "blocks_cached": ("blocks_cached",),
    "blocks_free": ("blocks_free",),
    "kv_utilization": ("kv_utilization",),
    "sharing_savings": ("sharing_savings",),
    "cow_copies": ("cow_copies",),
    "prefix_cache_queries": ("prefix_cache_queries",),
    "prefix_cache_hits": ("prefix_cache_hits",),
}


@dataclass(frozen=True)
class RemoteSnapshot:
    """What the memory panel shows for an engine on another server (localchat/ui/remote_panel.py)."""

    url: str
    model: str
    server: str = ""  # "vLLM", "SGLang", "llama.cpp", "localchat", or "" when not recognised
    values: dict = field(default_factory=dict)  # canonical key (GAUGES, ttft_mean_s) -> number
    families: int = 0  # metric families the server exposes in all
    error: str | None = None
    remote: bool = True  # the panel's switch: block tables are not available remotely


def _short(name: str) -> tuple[str, str]:
    prefix, _, rest = name.rpartition(":")
    return prefix, rest


def parse_metrics(text: str, url: str, model: str) -> RemoteSnapshot:
    """Sum each known figure over its label sets (vLLM labels by model and engine); counters are
    matched with or without their `_total` suffix, as exporters write both."""
    values: dict[str, float] = {}
    servers: list[str] = []
    ttft = {"_sum": 0.0, "_count": 0.0}
    families = list(text_string_to_metric_families(text))
    by_name = {name: key for key, names in GAUGES.items() for name in names}
    for family in families:
        for sample in family.samples:
            prefix, short = _short(sample.name)
            if prefix in SERVERS and SERVERS[prefix] not in servers:
                servers.append(SERVERS[prefix])
            if short.startswith("time_to_first_token_seconds") and short[len("time_to_first_token_seconds"):] in ttft:
                ttft[short[len("time_to_first_token_seconds"):]] += sample.value
                continue
            key = by_name.get(short, by_name.get(short.removesuffix("_total")))
            if key is not None:
                values[key] = values.get(key, 0.0) + sample.value
    queries, hits = values.get("prefix_cache_queries"), values.get("prefix_cache_hits")
    if queries and hits is not None and "prefix_cache_hit_rate" not in values:
        values["prefix_cache_hit_rate"] = hits / queries
    if ttft["_count"]:
        values["ttft_mean_s"] = ttft["_sum"] / ttft["_count"]
    return RemoteSnapshot(url=url, model=model, server=servers[0] if servers else "", values=values,
                          families=len({_short(f.name)[1].removesuffix("_total") for f in families}))


def read_metrics(http: httpx.Client, url: str, model: str) -> RemoteSnapshot:
    """GET /metrics and parse it; a server without one (or unreachable) gives a snapshot that says so."""
    try:
        response = http.get("/metrics", timeout=METRICS_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return RemoteSnapshot(url=url, model=model, error=f"could not read {url}/metrics: {exc}")
    if response.status_code != 200:
        return RemoteSnapshot(url=url, model=model, error=f"{url}/metrics answered {response.status_code}: this server exposes no metrics here")
    try:
        return parse_metrics(response.text, url, model)
    except ValueError as exc:
        log.info("unreadable metrics from %s: %s", url, exc)
        return RemoteSnapshot(url=url, model=model, error=f"{url}/metrics is not in Prometheus' text format")
