"""One forward pass for a scheduled batch: inputs and metadata in, sampled token ids out."""

from __future__ import annotations

import torch

from glakeserve.attention.base import AttentionBackend
from glakeserve.kv_cache import KVCache
from glakeserve.model.llama import LlamaModel
from glakeserve.request import Request
from glakeserve.sampling import SamplingBatch, sample
from glakeserve.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, attn: AttentionBackend, eos_token_ids: tuple[int, ...]):
        self.model = model
        self.kv = kv
        self.attn = attn
        self.device = model.device
        self.eos_token_ids = eos_token_ids

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, int]:
        """Runs the model over the batch's new tokens; returns {request_id: sampled token} for the
        requests whose known tokens are now all computed (the others are mid-prefill)."""
        ids, slots, qlens, ctxs = [], [], [], []
        samplers: list[Request] = []
        last_index = []  # index into the flat token list of each sampling request's last token
        flat = 0
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed_tokens
            tokens = req.all_token_ids[start:start + n]
            ids += tokens
            slots.append(req.slot.index)
            qlens.append(n)
            ctxs.append(start + n)
            flat += n
            if start + n == req.num_tokens:
                samplers.append(req)
                last_index.append(flat - 1)
        meta = self.attn.prepare_metadata(slots, qlens, ctxs, self.device)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        hidden = self.model.forward(input_ids, meta.positions, self.kv, self.attn, meta)
        if not samplers:
            return {}
        logits = self.model.logits(hidden[torch.tensor(last_index, device=self.device)])
        tokens = sample(logits, self.sampling_batch(samplers)).tolist()
        return {req.request_id: tok for req, tok in zip(samplers, tokens)}

    def sampling_batch(self, reqs: list[Request]) -> SamplingBatch:
        banned = []
        for r in reqs:
            if len(r.output_token_ids) < r.params.min_tokens:
                stops = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(self.eos_token_ids))
                banned.append(stops)
            else:
                banned.append([])
        return SamplingBatch(
            params=[r.params for r in reqs],
            seeds=[r.seed for r in reqs],
            steps=[len(r.output_token_ids) for r in reqs],
            output_ids=[r.output_token_ids for r in reqs],
            prompt_ids=[r.prompt_token_ids for r in reqs],
            banned=banned,
        )
