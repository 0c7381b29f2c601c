"""Which part of the model one tensor-parallel rank holds (Megatron's split of a Llama).

    q, k, v, gate, up   column-parallel: rank r holds a block of output rows (its heads, its
                        slice of the intermediate size); no communication
    o, down             row-parallel: rank r holds the matching block of input columns; the
                        partial outputs are summed by one all-reduce each
    embedding, lm_head  vocab-parallel: rank r holds rows [r * V', (r + 1) * V') of the vocabulary
                        padded to N * V'; lookups are summed by an all-reduce, logits gathered

KV heads: with kv_heads >= N each rank holds kv_heads / N of them; with kv_heads < N (N a multiple
of kv_heads) each rank holds the one KV head its query heads read, replicated on N / kv_heads ranks.
Every rank then holds the same number of KV heads, so every rank's KV pool has the same geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from glakeserve.model.config import ModelConfig


def shard_problems(cfg: ModelConfig, size: int) -> list[str]:
    """Why `size` ranks cannot split this model (empty when they can)."""
    problems = []
    H, KVH = cfg.num_heads, cfg.num_kv_heads
    if H % size:
        problems.append(f"{H} attention heads")
    if KVH % size and size % KVH:
        problems.append(f"{KVH} KV heads (neither divides the other)")
    if cfg.intermediate_size % size:
        problems.append(f"an intermediate size of {cfg.intermediate_size}")
    return problems


def valid_sizes(cfg: ModelConfig) -> list[int]:
    return [n for n in range(1, cfg.num_heads + 1) if not shard_problems(cfg, n)]


def check_tensor_parallel_size(cfg: ModelConfig, size: int, model_name: str = "the model") -> None:
    """Raises ValueError, saying which sizes work, unless `size` ranks can split the model."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    problems = shard_problems(cfg, size)
    if problems:
        sizes = ", ".join(map(str, valid_sizes(cfg)))
        raise ValueError(f"tensor_parallel_size={size} does not divide {model_name}'s {' and '.join(problems)}; "
                         f"sizes that work for it: {sizes}")


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    head_start: int  # first query head of this rank
    num_heads: int
    kv_head_start: int  # first KV head of this rank
    num_kv_heads: int
    inter_start: int  # first row of this rank's slice of gate and of up (column of down)
    inter_size: int
    vocab_start: int  # first vocabulary row of this rank's embedding / lm_head shard
    vocab_shard: int  # rows per rank (the vocabulary padded to size * vocab_shard)
    vocab_size: int  # the model's vocabulary

    @classmethod
    def plan(cls, cfg: ModelConfig, size: int, rank: int) -> TPShard:
        check_tensor_parallel_size(cfg, size)
        H, KVH, I = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
        if KVH >= size:
            kv_start, kv_n = rank * (KVH // size), KVH // size
        else:  # replicated: rank r's query heads all read KV head r // (size / KVH)
            kv_start, kv_n = rank // (size // KVH), 1
        vocab_shard = -(-cfg.vocab_size // size)
        return cls(rank=rank, size=size, head_start=rank * (H // size), num_heads=H // size,
                   kv_head_start=kv_start, num_kv_heads=kv_n, inter_start=rank * (I // size), inter_size=I // size,
                   vocab_start=rank * vocab_shard, vocab_shard=vocab_shard, vocab_size=cfg.vocab_size)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The shapes this rank computes with: its heads, KV heads and intermediate slice (the KV
        cache and attention see only these)."""
        return replace(cfg, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                       intermediate_size=self.inter_size)
