"""Shared helpers for the engine tests: tiny random HF checkpoints and direct model runs."""

from __future__ import annotations

from pathlib import Path

import torch

from glakeserve.attention import make_backend
from glakeserve.kv import PagedKVCache, VTensorKVCache
from glakeserve.model.config import config_from_hf
from glakeserve.model.loader import load_hf_weights
from glakeserve.request import Request, RequestMetrics
from glakeserve.sampling import SamplingParams
from glakeserve.scheduler import ScheduledBatch
from glakeserve.vtensor import PagePool


def save_tiny_hf_llama(path: Path, *, heads=4, kv_heads=2, hidden=64, layers=2, vocab=257, tie=False,
                       rope=None, seed=0, max_pos=512) -> Path:
    """A randomly initialised HF LlamaForCausalLM saved as safetensors: a reference with weights
    nobody tuned our code to."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    params = {"rope_type": "default", "rope_theta": 10000.0}
    if rope is not None:
        params = {**rope, "rope_theta": 10000.0}
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
        tie_word_embeddings=tie, rope_parameters=params, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def bare_request(request_id: str, prompt: list[int], max_tokens: int = 16, **params) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt), params=SamplingParams(**params), seed=0,
                   metrics=RequestMetrics(0.0), max_tokens=max_tokens)


class DirectRunner:
    """Our model + a KV cache on a host pool, driven by hand (no scheduler): each sequence id is a
    request admitted into a slot of the cache."""

    def __init__(self, path: Path, layout: str, max_len: int = 256, slots: int = 4, backend: str = "torch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.cfg = config_from_hf(path / "config.json")
        self.device = dev = torch.device(device)
        self.model = load_hf_weights(path, self.cfg, dtype, dev, max_len)
        if dev.type == "cuda":
            self.pool = PagePool(64, backend="cuda")
        else:
            self.pool = PagePool(256, page_size=16384, backend="host")
        if layout == "paged":
            self.kv = PagedKVCache(self.cfg, dtype, dev, max_len, slots, memory_bytes=4 << 20)
        else:
            self.kv = VTensorKVCache(self.pool, self.cfg, dtype, max_len, slots, layout=layout,
                                     prefix_caching=False)
        self.attn = make_backend(backend, dev, self.cfg.num_kv_heads)
        self.requests: dict[int, Request] = {}

    @torch.inference_mode()
    def run(self, chunks: list[tuple[int, list[int]]], done: dict[int, int], forward=None) -> list[torch.Tensor]:
        """chunks: (sequence id, new token ids) per sequence; done: tokens already cached per id.
        New ids are admitted in ascending order, so slots need not follow the batch's order.
        forward(ids, meta) -> hidden states stands in for the model's forward when given.
        Returns each sequence's logits [new tokens, vocab]."""
        for s in sorted(s for s, _ in chunks if s not in self.requests):
            self.requests[s] = bare_request(str(s), [])
            assert self.kv.admit(self.requests[s])
        batch = ScheduledBatch()
        for s, toks in chunks:
            req = self.requests[s]
            req.prompt_token_ids += toks
            start = done.get(s, 0)
            assert self.kv.reserve(req, start + len(toks))
            req.num_computed_tokens = start + len(toks)
            batch.requests.append(req)
            batch.num_new_tokens.append(len(toks))
            batch.starts.append(start)
        self.kv.begin_step(batch)
        slots = [r.slot.index for r in batch.requests]
        qlens = batch.num_new_tokens
        ctxs = [s + n for s, n in zip(batch.starts, qlens)]
        meta = self.attn.prepare_metadata(slots, qlens, ctxs, self.device, block_table=self.kv.block_table)
        ids = torch.tensor([t for _, toks in chunks for t in toks], device=self.device)
        if forward is None:
            hidden = self.model.forward(ids, meta.positions, self.kv, self.attn, meta)
        else:
            hidden = forward(ids, meta)
        logits = self.model.logits(hidden)
        self.kv.end_step(batch, None)
        for s, c in zip((s for s, _ in chunks), ctxs):
            done[s] = c
        return list(logits.split(qlens))

    def check_integrity(self) -> None:
        self.kv.check_integrity({r.slot.index: r.num_computed_tokens for r in self.requests.values()})

    def close(self):
        self.kv.close()
        self.pool.close()


def finish_all(engine, prompts: list, params, arrivals: list[int] | None = None) -> list[list[int]]:
    """Runs prompts (token id lists) through an engine to completion, prompt i added before step
    arrivals[i] (all at once by default); returns each one's output tokens, in prompt order."""
    arrivals = arrivals or [0] * len(prompts)
    ids, done, step = {}, {}, 0
    while len(ids) < len(prompts) or engine.has_unfinished_requests():
        for i, (p, at) in enumerate(zip(prompts, arrivals)):
            if at == step:
                ids[engine.add_request(p, params)] = i
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = out.token_ids
        step += 1
    return [done[i] for i in range(len(prompts))]


def drain(engine) -> None:
    """Steps the engine until every request it holds has finished."""
    while engine.has_unfinished_requests():
        engine.step()
