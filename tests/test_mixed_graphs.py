"""Piecewise graphs for prefill and mixed steps (glakeserve/mixed_graphs.py): the chain of pieces,
replayed on padded buffers with eager attention in between, computes what the model's forward
computes. On the CPU each piece is run again on the captured buffers (the plumbing: buffers,
padding, the pending-token lookup, the KV the pieces store); on a GPU the pieces are CUDA graphs."""

import random

import pytest
import torch

from glakeserve.mixed_graphs import MixedGraphs, token_buckets
from glakeserve.model_runner import HostStaging
from helpers import DirectRunner, save_tiny_hf_llama


def test_token_buckets_hold_every_count_with_little_padding():
    for top in (1, 50, 700, 8192, random.randint(2, 9000)):
        sizes = token_buckets(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] == top
        for n in [1, top, *random.sample(range(1, top + 1), min(top, 200))]:
            size = next(s for s in sizes if s >= n)
            limit = 16 if n <= 128 else 128 if n <= 2048 else 256 if n <= 4096 else 512
            assert size - n < limit, (top, n, size)


def test_more_tokens_than_the_largest_bucket_is_refused(tmp_path):
    runner = DirectRunner(save_tiny_hf_llama(tmp_path, layers=1), "token-major", slots=3)
    graphs = MixedGraphs(runner.model, runner.kv, runner.attn, 40, torch.zeros(runner.kv.num_slots, dtype=torch.int64))
    try:
        assert graphs.size_for(17) == 32 and graphs.size_for(40) == 40
        with pytest.raises(ValueError, match="at most 40"):
            graphs.size_for(41)
    finally:
        runner.close()


def _schedule(rng: random.Random, vocab: int) -> list[list[tuple[int, list[int]]]]:
    """Steps of (sequence id, new tokens): prefills of random lengths, then decode rows in front of
    chunks and new prompts (the scheduler's order), then decode only."""
    def toks(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    lens = [rng.randint(2, 40) for _ in range(3)]
    steps = [[(i + 1, toks(n)) for i, n in enumerate(lens)]]
    steps.append([(1, toks(1)), (2, toks(1)), (3, toks(rng.randint(2, 30))), (4, toks(rng.randint(20, 60)))])
    steps.append([(s, toks(1)) for s in (1, 2, 3)] + [(4, toks(rng.randint(1, 9)))])
    steps.append([(s, toks(1)) for s in (4, 2, 1, 3)])
    return steps


@pytest.mark.parametrize("layout,device", [
    ("token-major", "cpu"), ("paged", "cpu"),
    pytest.param("token-major", "cuda", marks=pytest.mark.gpu), pytest.param("paged", "cuda", marks=pytest.mark.gpu),
])
def test_pieces_compute_the_forward(tmp_path, layout, device):
    seed = random.getrandbits(16)
    path = save_tiny_hf_llama(tmp_path, layers=3, seed=seed)
    backend = "triton" if device == "cuda" else "torch"
    eager = DirectRunner(path, layout, slots=6, backend=backend, device=device)
    pieces = DirectRunner(path, layout, slots=6, backend=backend, device=device)
    last_token = torch.zeros(pieces.kv.num_slots, dtype=torch.int64, device=pieces.device)
    graphs = MixedGraphs(pieces.model, pieces.kv, pieces.attn, 128, last_token)  # steps of up to 120 tokens
    staging = HostStaging(pieces.device)
    rng = random.Random(seed)
    try:
        graphs.capture()
        done_e, done_p = {}, {}
        for step in _schedule(rng, pieces.cfg.vocab_size):
            def forward(ids, meta):
                # a one-token row's id is left on the device (-1), as the overlapped engine does
                host = ids.tolist()
                start = 0
                for s, toks in step:
                    if len(toks) == 1 and s in done_p:
                        last_token[pieces.requests[s].slot.index] = toks[0]
                        host[start] = -1
                    start += len(toks)
                staging.reset()
                return graphs.run(staging, host, meta)

            want = eager.run(step, done_e)
            got = pieces.run(step, done_p, forward=forward)
            for w, g in zip(want, got):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
            pieces.check_integrity()
    finally:
        graphs.release()
        eager.close()
        pieces.close()
