"""Tokens a KV page holds (the prefix cache's sharing grain, and the mapper's work per token) for
named shapes and both vTensor layouts, with the page size the engine picks by default: bfloat16 on a
GPU (multiples of the driver's 2 MiB), float32 on the host.

    python benchmarks/sharing_granularity.py
"""

from glakeserve.kv.vtensor_cache import default_page_size
from glakeserve.model.config import DUMMY_SHAPES

GPU_GRANULARITY = 2 << 20
OS_PAGE = 4096


def per_token(cfg, layout: str, itemsize: int) -> int:
    """Bytes of one token in one vTensor: all layers' K and V (token-major) or one layer's K (per-layer)."""
    return cfg.num_kv_heads * cfg.head_dim * itemsize * (2 * cfg.num_layers if layout == "token-major" else 1)


def describe(page: int, token: int) -> str:
    if page % token:
        return f"{page / token:.2f} tokens ({page >> 20} MiB page, tokens cut: no prefix caching)"
    return f"{page // token} tokens ({page / 2**20:.2f} MiB page)"


def main() -> None:
    print(f"{'shape':14s} {'layout':12s} {'GPU bf16':>44s} {'host fp32':>34s}")
    for name in ("smollm2-135m", "llama-2-7b", "llama-3-8b", "llama-13b"):
        cfg = DUMMY_SHAPES[name]
        for layout in ("token-major", "per-layer"):
            g, h = per_token(cfg, layout, 2), per_token(cfg, layout, 4)
            gpu = describe(default_page_size(g, GPU_GRANULARITY, host=False), g)
            host = describe(default_page_size(h, OS_PAGE, host=True), h)
            print(f"{name:14s} {layout:12s} {gpu:>44s} {host:>34s}")


if __name__ == "__main__":
    main()
