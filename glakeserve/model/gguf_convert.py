"""GGUF (llama.cpp) -> a HF-style directory: config.json, model.safetensors (float32) and the
tokenizer. Done once per file; the result is cached and later starts load it in seconds.

Two things differ from HF's layout besides the names: quantized tensors (dequantized here with the
gguf package), and the rows of attn_q / attn_k, which llama.cpp's converter reorders per head so
that rotary pairs are adjacent (rows [0, d/2) and [d/2, d) interleaved). We put them back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from glakeserve.model.config import ModelConfig, RopeScaling, SUPPORTED_ARCHITECTURES, UnsupportedModelError

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    stem, suffix = gguf_name.rsplit(".", 1)  # "blk.3.attn_q", "weight"
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    return f"{TOP_NAMES[stem]}.{suffix}"


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order: its rows are [head, d/2, 2] of HF's [head, 2, d/2]."""
    out_dim = w.shape[0]
    half = out_dim // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; GlakeServe runs Llama-architecture models "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    scaling = None
    if _field(reader, "llama.rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", float(_field(reader, "llama.rope.scaling.factor")))
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Writes config.json, model.safetensors and the tokenizer for gguf_path into out_dir
    (atomically: a half-written conversion is never left behind)."""
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises plain ValueErrors and struct errors
        raise ValueError(f"{gguf_path} is not a readable GGUF file ({e}); download it again") from e
    cfg = read_config(reader)
    tensors = {}
    for t in reader.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_rotary_rows(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rotary_rows(w, cfg.num_kv_heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tok.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
