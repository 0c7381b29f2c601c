"""/metrics in Prometheus' text format, from engine.stats().

KV pages are counted by who holds them: running requests, only the cache (idle slots and the
prefix cache, reclaimable at any time, as vLLM counts them), or nobody. glake_kv_pool_usage is
the requests' share, so an idle server whose cache still fills the pool reads 0, not "full"."""

from __future__ import annotations


def prometheus(stats: dict, model: str) -> str:
    pool, pages = stats["pool"], stats["kv_pages"]
    owned = [s for s in stats["slots"] if s["owner"] and not s.get("internal")]
    rows = [
        ("glake_requests_running", "gauge", "Requests being generated", stats["running"]),
        ("glake_requests_waiting", "gauge", "Requests queued", stats["waiting"]),
        ("glake_kv_pages_requests", "gauge", "KV pages held by running requests", pages["requests"]),
        ("glake_kv_pages_cached", "gauge",
         "KV pages held only by the prefix cache and idle slots (reclaimable at once)", pages["cached"]),
        ("glake_kv_pages_free", "gauge", "KV pages in the pool that nobody holds", pages["free"]),
        ("glake_kv_pool_pages", "gauge", "Physical pages in the pool", pages["total"]),
        ("glake_kv_pool_usage", "gauge", "Fraction of the pool held by running requests (cached pages count as "
                                         "free)", pages["requests"] / pages["total"] if pages["total"] else 0.0),
        ("glake_kv_pages_mapped", "gauge", "Physical KV pages mapped (requests, cache and padding)",
         pool["used_pages"]),
        ("glake_kv_pages_reserved", "gauge", "Virtual KV pages reserved by running requests' slots",
         sum(s["reserved_pages"] for s in owned)),
        ("glake_preemptions_total", "counter", "Requests preempted (recomputed later)", stats["preemptions"]),
        ("glake_mapping_waits_total", "counter", "Times a step waited on the mapping worker", stats["mapping_waits"]),
        ("glake_prompt_tokens_total", "counter", "Prompt tokens processed", stats["prompt_tokens"]),
        ("glake_generation_tokens_total", "counter", "Tokens generated", stats["generation_tokens"]),
        ("glake_requests_finished_total", "counter", "Requests finished", stats["finished"]),
    ]
    if stats.get("prefix_cache"):
        pc = stats["prefix_cache"]
        rows += [
            ("glake_prefix_cache_pages", "gauge", "KV pages indexed by the prefix cache", pc["cached_pages"]),
            ("glake_prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache", pc["lookups"]),
            ("glake_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache",
             pc["hit_tokens"]),
            ("glake_prefix_cache_evicted_total", "counter", "Prefix-cache entries evicted", pc["evicted"]),
        ]
    label = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f'{name}{{model="{label}"}} {value}']
    ranks = stats.get("rank_pools")
    if ranks:  # tensor parallelism: every rank's pool (rank="all": the sum)
        for name, help_, key in (("glake_kv_rank_pool_pages", "Physical pages in a rank's KV pool", "total_pages"),
                                 ("glake_kv_rank_pages_mapped", "Physical KV pages a rank has mapped", "used_pages"),
                                 ("glake_kv_rank_pages_free", "Physical KV pages free in a rank's pool", "free_pages")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
            lines += [f'{name}{{model="{label}",rank="{r["rank"]}"}} {r[key]}' for r in ranks]
            lines.append(f'{name}{{model="{label}",rank="all"}} {sum(r[key] for r in ranks)}')
    return "\n".join(lines) + "\n"
