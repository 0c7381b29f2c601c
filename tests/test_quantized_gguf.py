"""load_format gguf (the chat's CPU default): the GGUF's Q4_1 tensors run as 4-bit groups and its
Q8_0 output projection as int8 with the best logits recomputed exactly. The layers recover the
file's codes exactly; the engine's greedy output stays that of the float32 model."""

import pytest
import torch

from glakeserve.model.loader import ModelNotFoundError, gguf_tensor_types, default_gguf_path, resolve_model
from glakeserve.model.quant import Int4Linear, Int8Linear, RescoredHead
from glakeserve.sampling import SamplingParams


def q4_1_like(out_features, in_features, seed=0):
    """A dequantized Q4_1 tensor: per group of 32 inputs, codes 0..15 (both ends used) * scale + min."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(out_features, in_features // 32, 1, generator=g) * 0.01 + 1e-3
    low = -torch.rand(out_features, in_features // 32, 1, generator=g) * 0.05
    return (codes * scale + low).reshape(out_features, in_features)


def test_int4_recovers_q4_1_codes_and_matches_the_dense_matmul():
    w = q4_1_like(96, 128)
    lin = Int4Linear.from_dense(w)
    x = torch.randn(5, 128)
    ref = x @ w.t()
    # bfloat16 activations and scales: errors of a few bf16 steps, not of a wrong code (>= one scale)
    assert (lin(x) - ref).abs().max() < 0.02 * ref.abs().max()
    assert lin(x).dtype == torch.float32 and lin(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not 4-bit groups of 32"):
        Int4Linear.from_dense(torch.randn(96, 128))  # a dense weight is refused, never silently rounded


def test_int8_and_the_rescored_head():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3000, 64, generator=g) * 0.5
    x = torch.randn(3, 64, generator=g)
    ref = x @ w.t()
    approx = Int8Linear.from_dense(w)(x)
    assert (approx - ref).abs().max() < 0.05 * ref.abs().max()
    head = RescoredHead(w)
    logits = head(x)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    top = ref.topk(3, dim=-1).indices
    torch.testing.assert_close(logits.gather(1, top), ref.gather(1, top), rtol=1e-5, atol=1e-4)  # exact at the top


def test_load_format_gguf_needs_a_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="load_format gguf runs a .gguf file"):
        resolve_model(str(tmp_path), "gguf")


def test_the_packaged_model_is_q4_1_and_gguf_greedy_follows_float32(smol_llm):
    from glakeserve.llm import LLM

    types = gguf_tensor_types(default_gguf_path())
    assert types["model.layers.0.mlp.gate_proj.weight"] == "Q4_1"
    assert types["model.embed_tokens.weight"] == "Q8_0"
    quick = LLM(max_model_len=512, max_num_seqs=8, kv_cache_memory=96 << 20, load_format="gguf")
    try:
        assert quick.engine.model_name == "SmolLM2-135M-Instruct (Q4_1)"
        tok = quick.tokenizer
        questions = ["What is the capital of France?", "Explain photosynthesis to a child.",
                     "List three uses of a paperclip.", "How do I boil an egg?", "Name a famous painter."]
        ids = [tok.chat_ids([{"role": "user", "content": q}]) for q in questions]
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        dense = [o.token_ids for o in smol_llm.generate(ids, params)]
        fast = quick.generate(ids, params)
    finally:
        quick.close()

    def agreeing(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    same = [agreeing(a, o.token_ids) for a, o in zip(dense, fast)]
    # measured: all 16 tokens on every one of these; allow one prompt to drift after 6 tokens
    assert sorted(same)[1:] == [16] * (len(same) - 1) and min(same) >= 6, same
    assert "Paris" in fast[0].text
