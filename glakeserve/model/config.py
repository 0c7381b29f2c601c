"""Model configuration: the Llama hyper-parameters we need, read from a HF config.json or a GGUF
header, plus the named shapes `--load-format dummy` offers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, per byte of dtype (multiply by itemsize)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def to_hf_dict(self) -> dict:
        """The config.json HF transformers' LlamaForCausalLM reads."""
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            d["rope_scaling"] = {"rope_type": rs.kind, "factor": rs.factor}
            if rs.kind == "llama3":
                d["rope_scaling"].update(
                    low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings,
                )
        return d


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(ValueError):
    """The weights are of an architecture GlakeServe does not implement."""


def config_from_hf(path: Path) -> ModelConfig:
    """Reads a HF config.json; raises UnsupportedModelError for architectures other than Llama's."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read model config {path}: {e}. Is this a HF model directory?") from e
    archs = raw.get("architectures") or [raw.get("model_type", "unknown")]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and raw.get("model_type") != "llama":
        raise UnsupportedModelError(
            f"{path.parent}: architecture {archs[0]} is not supported; GlakeServe runs Llama-architecture "
            f"models ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    heads = raw["num_attention_heads"]
    scaling = None
    rs = raw.get("rope_scaling") or (raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else None)
    if rs:
        kind = rs.get("rope_type") or rs.get("type")
        if kind in ("llama3", "linear"):
            scaling = RopeScaling(
                kind=kind,
                factor=float(rs["factor"]),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
            )
        elif kind not in (None, "default"):
            raise UnsupportedModelError(f"{path.parent}: rope scaling {kind!r} is not supported (llama3, linear are)")
    theta = raw.get("rope_theta")
    if theta is None and isinstance(raw.get("rope_parameters"), dict):
        theta = raw["rope_parameters"].get("rope_theta")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return ModelConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _shape(vocab, hidden, inter, layers, heads, kv_heads, ctx, theta=10000.0, scaling=None, tie=False) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hidden // heads, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=ctx, tie_word_embeddings=tie, bos_token_id=1, eos_token_ids=(2,),
    )


# Shapes for --load-format dummy (random weights), as published for each model.
DUMMY_SHAPES: dict[str, ModelConfig] = {
    "llama-7b": _shape(32000, 4096, 11008, 32, 32, 32, 2048),
    "llama-2-7b": _shape(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-13b": _shape(32000, 5120, 13824, 40, 40, 40, 2048),
    "llama-2-13b": _shape(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama-3-8b": _shape(128256, 4096, 14336, 32, 32, 8, 8192, theta=500000.0),
    "llama-3.1-8b": _shape(
        128256, 4096, 14336, 32, 32, 8, 131072, theta=500000.0,
        scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    ),
    "llama-3-70b": _shape(128256, 8192, 28672, 80, 64, 8, 8192, theta=500000.0),
    "smollm2-135m": replace(_shape(49152, 576, 1536, 30, 9, 3, 8192, theta=100000.0, tie=True), rms_norm_eps=1e-5),
    # tiny shapes for tests and quick runs
    "tiny-llama": _shape(1024, 128, 256, 2, 4, 2, 1024),
}


def config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
