"""Tokens a KV page holds (the prefix cache's sharing grain) for named shapes and both vTensor
layouts: 2 MiB pages in bfloat16 on a GPU; on the host, float32 in the page size the engine picks.

    python benchmarks/sharing_granularity.py
"""

from glakeserve.kv_cache import aligned_host_page_size
from glakeserve.model.config import DUMMY_SHAPES

GPU_PAGE = 2 << 20


def per_token(cfg, layout: str, itemsize: int) -> int:
    """Bytes of one token in one vTensor: all layers' K and V (token-major) or one layer's K (per-layer)."""
    return cfg.num_kv_heads * cfg.head_dim * itemsize * (2 * cfg.num_layers if layout == "token-major" else 1)


def main() -> None:
    print(f"{'shape':14s} {'layout':12s} {'GPU bf16, 2 MiB pages':>32s} {'host fp32, engine page':>34s}")
    for name in ("smollm2-135m", "llama-2-7b", "llama-3-8b"):
        cfg = DUMMY_SHAPES[name]
        for layout in ("token-major", "per-layer"):
            g = per_token(cfg, layout, 2)
            gpu = f"{GPU_PAGE // g} tokens" if GPU_PAGE % g == 0 else f"none ({GPU_PAGE / g:.2f} a page: tokens cut)"
            h = per_token(cfg, layout, 4)
            page = aligned_host_page_size(h)
            print(f"{name:14s} {layout:12s} {gpu:>32s} {f'{page // h} tokens ({page / 2**20:.2f} MiB page)':>34s}")


if __name__ == "__main__":
    main()
