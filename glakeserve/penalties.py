"""Repetition, presence and frequency penalties from token counts kept on the device.

Each request that uses a penalty owns a row of two [rows, vocab] tensors: how often each token
occurs in its output (int32) and whether it occurs in its prompt (bool). A row is filled once, when
the request first samples, and afterwards only the step's sampled tokens are added to it, on the
device, in the same stream as the sampling: nothing is rebuilt from Python lists, and the next step
can be launched before the host has read the tokens (the engine stays overlapped). A row outlives a
preemption (recompute keeps the output tokens, so their counts stay right) and is given back once
its request has finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 4 << 20  # logits penalised at once (16 MB a float32 temporary)


@dataclass
class PenaltyRows:
    """The batch rows that use penalties and their counts, as the sampler reads them."""

    rows: list[int]  # batch rows, in order
    counts: torch.Tensor  # [len(rows), vocab] int32: occurrences of each token in the output so far
    in_prompt: torch.Tensor  # [len(rows), vocab] bool: the token occurs in the prompt

    @classmethod
    def from_lists(cls, rows: list[int], outputs: list[list[int]], prompts: list[list[int]], vocab: int,
                   device: torch.device | str = "cpu") -> PenaltyRows:
        """Counts built from token lists (for a one-off batch and for tests)."""
        counts = torch.zeros(len(rows), vocab, dtype=torch.int32, device=device)
        in_prompt = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for j, (out, prompt) in enumerate(zip(outputs, prompts)):
            if out:
                counts[j].index_add_(0, torch.tensor(out, device=device),
                                     torch.ones(len(out), dtype=torch.int32, device=device))
            if prompt:
                in_prompt[j, torch.tensor(prompt, device=device)] = True
        return cls(rows, counts, in_prompt)

    def apply(self, logits: torch.Tensor, params: list, to_device, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        """In place on logits [batch, vocab]: repetition penalty on every token seen in the prompt or
        the output (divides a positive logit, multiplies a negative one), then minus
        frequency * count and presence * (count > 0) for the output's tokens (vLLM's definitions).
        Rows go in chunks of about chunk_elements logits: the half-dozen [rows, vocab] temporaries
        stay bounded (all 256 rows of a 128K vocabulary at once would take ~0.8 GB beside the KV
        pool; a chunk of 32 rows takes ~100 MB)."""
        n = len(self.rows)
        ps = [params[i] for i in self.rows]
        rep, freq, pres = to_device([p.repetition_penalty for p in ps] + [p.frequency_penalty for p in ps]
                                    + [p.presence_penalty for p in ps], torch.float32).view(3, n, 1)
        index = to_device(self.rows, torch.int64)
        step = max(1, chunk_elements // max(1, logits.shape[1]))
        for a in range(0, n, step):
            b = min(n, a + step)
            x = logits.index_select(0, index[a:b])  # float32
            counts = self.counts[a:b]
            in_output = counts > 0
            penalized = torch.where(x > 0, x / rep[a:b], x * rep[a:b])
            x = torch.where(in_output | self.in_prompt[a:b], penalized, x)
            x = x - freq[a:b] * counts.to(x.dtype) - pres[a:b] * in_output.to(x.dtype)
            logits.index_copy_(0, index[a:b], x)


class PenaltyCounts:
    """The device rows of every live request that uses penalties (see the module's docstring)."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(0, vocab, dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.owner: dict[int, tuple[object, int]] = {}  # id(request) -> (request, row)
        self.free: list[int] = []

    @property
    def rows_in_use(self) -> int:
        return len(self.owner)

    def rows_for(self, batch_rows: list[int], reqs: list, to_device) -> PenaltyRows:
        """The rows of reqs (the requests at batch_rows), a new row filled for a request seen the
        first time. to_device(values, dtype) stages small host lists without a sync."""
        self._release_finished()
        rows = [self._row(r, to_device) for r in reqs]
        index = to_device(rows, torch.int64)
        return PenaltyRows(batch_rows, self.counts.index_select(0, index), self.in_prompt.index_select(0, index))

    def add_sampled(self, reqs: list, tokens: torch.Tensor, to_device) -> None:
        """Counts each request's sampled token (tokens: the device tensor the sampler returned, one per
        request in reqs), without reading it on the host."""
        rows = to_device([self.owner[id(r)][1] for r in reqs], torch.int64)
        ones = torch.ones(len(reqs), dtype=torch.int32, device=self.device)
        self.counts.index_put_((rows, tokens), ones, accumulate=True)

    def _row(self, req, to_device) -> int:
        known = self.owner.get(id(req))
        if known is not None and known[0] is req:
            return known[1]
        if not self.free:
            self._grow()
        row = self.free.pop()
        self.owner[id(req)] = (req, row)
        self.counts[row].zero_()
        self.in_prompt[row].zero_()
        if req.output_token_ids:  # only a request whose row was never made yet (e.g. penalties set late)
            out = to_device(req.output_token_ids, torch.int64)
            self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
        if req.prompt_token_ids:
            self.in_prompt[row].index_fill_(0, to_device(req.prompt_token_ids, torch.int64), True)
        return row

    def _grow(self) -> None:
        """Doubles the rows (at least 8); the new rows go on the free list."""
        old = self.counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, self.vocab, dtype=torch.int32, device=self.device)
        in_prompt = torch.zeros(new, self.vocab, dtype=torch.bool, device=self.device)
        counts[:old].copy_(self.counts)
        in_prompt[:old].copy_(self.in_prompt)
        self.counts, self.in_prompt = counts, in_prompt
        self.free += range(new - 1, old - 1, -1)

    def _release_finished(self) -> None:
        """Rows of finished requests go back to the free list. Reusing one is safe with a step still
        in flight: its update and the new owner's fill are ordered on the same stream."""
        done = [key for key, (req, _) in self.owner.items() if req.finished]
        for key in done:
            self.free.append(self.owner.pop(key)[1])
