"""The KV subsystem behind one seam (base.KVCache): vTensor slots (the point of this project) and the
paged baseline. make_kv_cache sizes the pool from the device's memory and builds the cache, which
then owns the pool's whole life."""

from __future__ import annotations

import os

import torch

from glakeserve import vtensor
from glakeserve.kv.base import ANCHOR, KVCache, KVCacheTooSmallError, KVLayout, KVStats, Slot
from glakeserve.kv.paged import PagedKVCache
from glakeserve.kv.prefix import PrefixStats
from glakeserve.kv.vtensor_cache import VTensorKVCache, default_page_size
from glakeserve.model.config import ModelConfig

__all__ = ["ANCHOR", "KVCache", "KVCacheTooSmallError", "KVLayout", "KVStats", "PagedKVCache", "PrefixStats", "Slot",
           "VTensorKVCache", "make_kv_cache", "memory_info", "kv_cache_bytes"]


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device's memory (the machine's available memory on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    return free, total


def kv_cache_bytes(setting: float | None, device: torch.device, info: tuple[int, int]) -> int:
    """The pool's starting size: `setting` bytes (> 1) or that fraction of free memory (<= 1); by
    default all but 10% (at least 1 GiB) of a GPU's free memory, or 10% of a CPU's (at most 1 GiB)."""
    free, total = info
    if setting is None:
        if device.type == "cuda":
            return max(0, int(free - max(1 << 30, 0.1 * total)))
        return int(min(0.1 * free, 1 << 30))
    if not setting > 0:
        raise ValueError(f"kv_cache_memory must be positive (bytes, or a fraction of free memory), got {setting}")
    return int(setting * free) if setting <= 1 else int(setting)


def make_kv_cache(layout: KVLayout | str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                  max_model_len: int, num_slots: int, memory: float | None = None, max_memory: float | None = None,
                  page_size: int | None = None, prefix_caching: bool = True, lookahead_tokens: int = 64,
                  pool_class: type[vtensor.PagePool] = vtensor.PagePool) -> KVCache:
    """memory / max_memory: bytes (> 1) or fractions of free memory (<= 1); max_memory is how far a
    vTensor pool may grow when short (default: where it starts). page_size: bytes of a pool page
    (a multiple of the driver's 2 MiB on a GPU); by default one that holds at least 16 tokens.
    pool_class: the PagePool to build (tensor parallelism's rank 0 records its page operations)."""
    gpu = device.type == "cuda"
    per_token = cfg.num_kv_heads * cfg.head_dim * dtype.itemsize  # in one vTensor, one layer's K
    whole = per_token * 2 * cfg.num_layers  # a token's K and V of every layer
    try:
        layout = KVLayout(layout)
    except ValueError:
        raise ValueError(f"kv_layout must be one of {', '.join(x.value for x in KVLayout)}; got {layout!r}") from None
    info = memory_info(device)
    start = kv_cache_bytes(memory, device, info)
    if layout is KVLayout.PAGED:
        return PagedKVCache(cfg, dtype, device, max_model_len, num_slots, start)
    if layout is not KVLayout.PER_LAYER:
        per_token = whole
    pool = pool_class(0, page_size=page_size, backend="cuda" if gpu else "host", device=device.index or 0)
    try:
        if page_size is None:
            granularity = pool.page_size if gpu else 4096
            chosen = default_page_size(per_token, granularity, host=not gpu)
            if chosen != pool.page_size:
                pool.close()
                pool = pool_class(0, page_size=chosen, backend="cuda" if gpu else "host",
                                        device=device.index or 0)
        per_block = 2 * cfg.num_layers if layout is KVLayout.PER_LAYER else 1
        pages = start // pool.page_size // per_block * per_block
        pool.grow(pages)
        limit = pages
        if max_memory is not None:
            limit = int(max_memory * info[0] if max_memory <= 1 else max_memory) // pool.page_size
        cache = VTensorKVCache(pool, cfg, dtype, max_model_len, num_slots, layout=layout,
                               lookahead_tokens=lookahead_tokens, prefix_caching=prefix_caching, max_pages=limit,
                               owns_pool=True)
    except BaseException:
        pool.close()
        raise
    return cache
