"""Finding weights: the embedded default (converted once, then from the cache), HF directories,
dummy shapes, and clear errors for everything else."""

import json
import time

import pytest
import torch

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.model.config import DUMMY_SHAPES, UnsupportedModelError
from glakeserve.model.loader import ModelNotFoundError, load_model, resolve_model
from helpers import save_tiny_hf_llama


def test_default_model_loads_from_the_cache_quickly(smollm2_dir):
    t0 = time.monotonic()
    src = resolve_model(None)
    assert src.path == smollm2_dir and (src.path / "model.safetensors").exists()
    assert time.monotonic() - t0 < 5  # no second conversion


def test_unknown_model_says_what_to_do():
    with pytest.raises(ModelNotFoundError, match=r"no weights for 'some-org/missing-model' on this machine.*"
                                                 r"--load-format dummy"):
        resolve_model("some-org/missing-model")
    with pytest.raises(ModelNotFoundError, match="no dummy shape named 'llama-99b'"):
        resolve_model("llama-99b", load_format="dummy")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="architecture GPT2LMHeadModel is not supported"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_corrupt_and_incomplete_checkpoints(tmp_path):
    path = save_tiny_hf_llama(tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated.*download the model again"):
        LLMEngine(EngineConfig(model=str(path)))
    from safetensors.torch import load_file, save_file

    path2 = save_tiny_hf_llama(tmp_path / "m2")
    tensors = load_file(path2 / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path2 / "model.safetensors")
    with pytest.raises(ValueError, match=r"incomplete, model.layers.1.mlp.up_proj.weight is missing"):
        LLMEngine(EngineConfig(model=str(path2)))


def test_missing_dir_and_bad_settings(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype must be auto"):
        LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", dtype="float8"))
    with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
        LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=4096))


def test_dummy_shapes():
    for name in ("llama-7b", "llama-2-7b", "llama-3-8b", "llama-13b", "smollm2-135m"):
        assert name in DUMMY_SHAPES
    cfg = DUMMY_SHAPES["llama-3-8b"]
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (32, 8, 128, 128256)
    engine = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", kv_cache_memory=16 << 20))
    rid = engine.add_request([1, 2, 3, 4], None)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == rid and outs[-1].finished
    engine.close()


def test_hf_directory_in_float16_and_bfloat16(tmp_path):
    path = save_tiny_hf_llama(tmp_path / "m")
    for dtype in (torch.float16, torch.bfloat16):
        src = resolve_model(str(path))
        model = load_model(src, dtype, torch.device("cpu"), 128)
        assert model.embed.dtype == dtype
