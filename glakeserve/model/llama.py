"""Our Llama: RMSNorm, RoPE (with llama3 and linear scaling), GQA attention, SwiGLU MLP, tied or
untied embeddings. The model sees only token ids, positions, per-layer KV views and the attention
backend's metadata; it never touches the allocator.

Weights are held fused where that saves kernel launches: q, k, v as one [(H + 2 * KVH) * D, hidden]
matrix and gate, up as one [2 * I, hidden] matrix (loader.py fuses HF's separate tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glakeserve.model import fused_ops
from glakeserve.model.config import ModelConfig
from glakeserve.model.gemv import gemv


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with the config's scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    if rs.kind == "linear":
        return inv_freq / rs.factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(between, blended, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position up to max_positions, in float32."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device):
        inv_freq = rope_inv_freq(cfg).to(device)
        t = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [positions, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [positions, head_dim]
        self.cos = emb.cos()
        self.sin = emb.sin()

        half = cfg.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * signed_sin, with the first half of sin negated
        self.signed_sin = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [tokens, 1, head_dim] for a batch: looked up once, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


ONE_ROW_GEMV = True  # one-token products on the GPU take model/gemv.py; False: cuBLAS (a benchmark's baseline)


class Linear:
    """A weight [out, in] applied as x @ W^T. On the CPU a wide matrix (out > in) also keeps a
    transposed copy [in, out] for one-token steps: MKL streams that layout about 2x faster at
    batch 1 (benchmarks/RESULTS.md), while [out, in] is faster from a few rows on. On the GPU a
    one-token product of a 16-bit weight takes our GEMV kernel (gemv.py) instead of cuBLAS."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        wide = weight.device.type == "cpu" and weight.shape[0] > weight.shape[1]
        self.weight_t = weight.t().contiguous() if wide else None
        self.one_row_gemv = weight.is_cuda and weight.element_size() == 2 and weight.stride(-1) == 1

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, in] -> [n, out], into `out` [n, out] when given."""
        if x.shape[0] == 1:
            if self.one_row_gemv and ONE_ROW_GEMV and x.stride(-1) == 1:
                return gemv(x, self.weight, out=out)
            if self.weight_t is not None:
                return x @ self.weight_t if out is None else torch.mm(x, self.weight_t, out=out)
        return F.linear(x, self.weight) if out is None else torch.mm(x, self.weight.t(), out=out)


def as_linear(w):
    """A dense weight tensor becomes a Linear; a quantized layer (model/quant.py) is one already."""
    return Linear(w) if isinstance(w, torch.Tensor) else w


@dataclass
class LayerWeights:
    """Each matrix is a dense tensor or a quantized layer of that shape (load_format gguf)."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 * KVH) * D, hidden]
    o: torch.Tensor  # [hidden, H * D]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * I, hidden]
    down: torch.Tensor  # [hidden, I]


class Layer:
    def __init__(self, w: LayerWeights):
        self.input_norm, self.post_norm = w.input_norm, w.post_norm
        self.qkv, self.o, self.gate_up, self.down = (as_linear(w.qkv), as_linear(w.o), as_linear(w.gate_up),
                                                     as_linear(w.down))


class LlamaModel:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head, max_positions: int, tp=None):
        """lm_head: a dense [vocab, hidden] tensor, a quantized layer, or None (tied to embed).
        tp: a distributed.TPGroup when this is one rank's shard (cfg then has the rank's heads, KV
        heads and intermediate size; embed and lm_head its vocabulary rows); None for the whole model."""
        self.cfg = cfg
        self.tp = tp
        self.embed = embed  # [vocab, hidden]
        self.layers = [Layer(w) for w in layers]
        self.norm = norm
        self.lm_head = as_linear(embed if lm_head is None else lm_head)
        self.dtype = embed.dtype
        self.device = embed.device
        self.rotary = RotaryEmbedding(cfg, max_positions, self.device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # on a GPU the elementwise work runs as fused Triton kernels; on the CPU as their torch twins
        gpu = self.device.type == "cuda"
        self._add_norm = fused_ops.add_rms_norm if gpu else fused_ops.add_rms_norm_torch
        self._silu_mul = fused_ops.silu_mul if gpu else fused_ops.silu_mul_torch
        self._rope = fused_ops.rope_ if gpu else fused_ops.rope_torch

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache, attn, meta) -> torch.Tensor:
        """input_ids, positions: [tokens] for all sequences of the batch back to back.
        kv_cache: k_cache(layer) / v_cache(layer) views; attn: the attention backend; meta: its
        per-batch metadata. Returns the final hidden states [tokens, hidden].
        The forward is a chain of pieces (begin, then per layer project_qkv, store_kv, attend,
        finish_layer); piecewise CUDA graphs (mixed_graphs.py) capture all but `attend` and run the
        same pieces in the same order."""
        x, residual, rope = self.begin(input_ids, positions)
        for i in range(len(self.layers)):
            qkv = self.project_qkv(i, x, rope)
            self.store_kv(i, qkv, kv_cache, attn, meta)
            o = self.attend(i, qkv, kv_cache, attn, meta)
            x, residual = self.finish_layer(i, o, residual)
        return x

    def begin(self, input_ids: torch.Tensor, positions: torch.Tensor):
        """(first layer's normalised input, residual stream, rope tables). A rank's shard first takes
        rank 0's token ids (the other ranks pass a buffer of the right size): the broadcast is part of
        the forward, so a decode CUDA graph holds it too."""
        if self.tp is not None:
            self.tp.broadcast(input_ids)
        rope = self.rotary.tables(positions, self.dtype)
        # the residual stream: each add_norm adds a sublayer's output and normalises for the next
        x, residual = self._add_norm(self._embed(input_ids), None, self.layers[0].input_norm, self.cfg.rms_norm_eps)
        return x, residual, rope

    def project_qkv(self, i: int, x: torch.Tensor, rope, out: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i's q, k, v [tokens, H + 2 KVH, D], q and k rotated; into `out` when given."""
        cfg = self.cfg
        proj = self.layers[i].qkv
        if out is None:
            qkv = proj(x)
        elif isinstance(proj, Linear):
            qkv = proj(x, out=out.view(x.shape[0], -1))
        else:  # a quantized layer (CPU) has no out=
            qkv = out.view(x.shape[0], -1).copy_(proj(x))
        qkv = qkv.view(-1, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim)
        self._rope(qkv, cfg.num_heads + cfg.num_kv_heads, *rope)  # q and k rotate in place
        return qkv

    def store_kv(self, i: int, qkv: torch.Tensor, kv_cache, attn, meta) -> None:
        H, KVH = self.cfg.num_heads, self.cfg.num_kv_heads
        attn.store_kv(kv_cache.k_cache(i), kv_cache.v_cache(i), qkv[:, H:H + KVH], qkv[:, H + KVH:], meta)

    def attend(self, i: int, qkv: torch.Tensor, kv_cache, attn, meta, out: torch.Tensor | None = None):
        """Layer i's attention output [tokens, H, D] (into `out` when given)."""
        q = qkv[:, :self.cfg.num_heads]
        return attn.forward(q, kv_cache.k_cache(i), kv_cache.v_cache(i), meta, out=out)

    def finish_layer(self, i: int, o: torch.Tensor, residual: torch.Tensor):
        """Layer i after its attention: output projection, MLP, and the next norm (the next layer's
        input norm, or the final norm after the last layer). Returns (x, residual)."""
        layer, eps = self.layers[i], self.cfg.rms_norm_eps
        attn_out = layer.o(o.reshape(-1, self.q_size))
        if self.tp is not None:  # row-parallel: each rank's heads give a partial sum
            self.tp.all_reduce(attn_out)
        x, residual = self._add_norm(attn_out, residual, layer.post_norm, eps)
        mlp = layer.down(self._silu_mul(layer.gate_up(x)))
        if self.tp is not None:
            self.tp.all_reduce(mlp)
        next_norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
        return self._add_norm(mlp, residual, next_norm, eps)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(input_ids, self.embed)
        shard = self.tp.shard  # vocab-parallel: rows outside this rank's shard look up zeros
        local = input_ids - shard.vocab_start
        outside = (local < 0) | (local >= shard.vocab_shard)
        x = F.embedding(local.clamp(0, shard.vocab_shard - 1), self.embed)  # [tokens, hidden]
        x.masked_fill_(outside.unsqueeze(1), 0)
        return self.tp.all_reduce(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[n, hidden] -> [n, vocab] in float32 (a shard: on rank 0, None on the others)."""
        if self.tp is None:
            return self.lm_head(hidden).float()
        full = self.tp.gather_cat(self.lm_head(hidden).float().contiguous())  # [n, size * vocab_shard]
        return None if full is None else full[:, :self.tp.shard.vocab_size]
