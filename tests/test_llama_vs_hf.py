"""Our Llama against HF transformers' on random tiny configs: same logits, through our KV cache
(both layouts), in one pass and in chunks after a cached prefix, several sequences per batch."""

import pytest
import torch

from helpers import DirectRunner, save_tiny_hf_llama

CONFIGS = {
    "mha-untied": dict(heads=4, kv_heads=4, tie=False),
    "gqa-tied": dict(heads=8, kv_heads=2, tie=True),
    "gqa-llama3-rope": dict(heads=4, kv_heads=1, rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mha-linear-rope": dict(heads=4, kv_heads=4, rope={"rope_type": "linear", "factor": 4.0}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    seed = int(torch.randint(0, 10_000, ()).item())
    path = save_tiny_hf_llama(tmp_path_factory.mktemp(request.param), seed=seed, **CONFIGS[request.param])
    from transformers import LlamaForCausalLM

    return path, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: its interpreter on the CPU
@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer", "paged"])
def test_logits_match_hf(tiny, layout, backend):
    path, hf = tiny
    runner = DirectRunner(path, layout, backend=backend)
    try:
        seqs = [torch.randint(3, 257, (n,)).tolist() for n in (37, 5, 90)]
        with torch.no_grad():
            ref = [hf(torch.tensor([s])).logits[0] for s in seqs]
        done: dict[int, int] = {}
        # pass 1: the first part of each sequence, all three in one batch (in slots 2, 1, 3)
        cut = [20, 3, 61]
        out = runner.run([(2, seqs[0][:cut[0]]), (1, seqs[1][:cut[1]]), (3, seqs[2][:cut[2]])], done)
        for o, r, c in zip(out, ref, cut):
            torch.testing.assert_close(o, r[:c], rtol=1e-4, atol=1e-4)
        # pass 2: the rest, attending to the cached prefix
        out = runner.run([(2, seqs[0][cut[0]:]), (1, seqs[1][cut[1]:]), (3, seqs[2][cut[2]:])], done)
        for o, r, c in zip(out, ref, cut):
            torch.testing.assert_close(o, r[c:], rtol=1e-4, atol=1e-4)
        # pass 3: one decode token each
        nxt = [int(torch.randint(3, 257, ())) for _ in seqs]
        with torch.no_grad():
            ref = [hf(torch.tensor([s + [t]])).logits[0, -1] for s, t in zip(seqs, nxt)]
        out = runner.run([(2, [nxt[0]]), (1, [nxt[1]]), (3, [nxt[2]])], done)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o[0], r, rtol=1e-4, atol=1e-4)
        # pass 4: a mixed step, decoding sequences in front of one that extends by several tokens
        seqs = [s + [t] for s, t in zip(seqs, nxt)]
        more = [[int(torch.randint(3, 257, ()))], [int(torch.randint(3, 257, ()))], torch.randint(3, 257, (6,)).tolist()]
        with torch.no_grad():
            ref = [hf(torch.tensor([s + m])).logits[0, -len(m):] for s, m in zip(seqs, more)]
        out = runner.run([(2, more[0]), (1, more[1]), (3, more[2])], done)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
        runner.check_integrity()
    finally:
        runner.close()
