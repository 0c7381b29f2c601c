"""Prompt logprobs (SamplingParams.prompt_logprobs): each prompt token's logprob given the tokens
before it, computed in the prefill from the hidden states the step already has.

    position p of the prompt -> hidden[p] -> logits -> log_softmax -> the logprob of token p + 1

so a prompt of P tokens has P - 1 rows (positions 0 .. P - 2; the last position's logits give the
first output token, not a prompt logprob). A step computes the rows of the positions it computes
(chunked prefill spreads them over steps); the scheduler counts the rows launched, so a request
recomputed after a preemption does not compute them again.

The logprobs are raw, as vLLM's: log_softmax of the model's logits, no logit bias, penalties or
temperature. The vocabulary is large (128k for Llama 3), so rows go through the lm_head in chunks
of at most max_rows, and only the token's logprob, its rank and the top k survive a chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glakeserve.request import Request, TokenLogprob

CHUNK_BYTES = 64 << 20  # float32 logits of one chunk of rows, at most


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: [rows, vocab] float32 logits within CHUNK_BYTES (their log_softmax takes as much)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


@dataclass
class PromptRows:
    """One step's prompt logprob rows: on the device after launch, pinned host copies on a GPU."""

    spans: list[tuple[Request, int, int]]  # (request, first, stop): its positions [first, stop), in row order
    values: torch.Tensor  # [rows, 1 + k] float32: the prompt token's logprob, then the top k's
    top_ids: torch.Tensor  # [rows, k] int64, most likely first
    ranks: torch.Tensor  # [rows] int64: 1 + the tokens more likely than the prompt token


def compute(logits_fn, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, num_rows: int, k: int,
            max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [tokens, hidden]; rows, targets [num_rows] int64 on the device: the rows of hidden to
    score and the token each predicts. logits_fn: [n, hidden] -> [n, vocab] float32, called on at
    most max_rows rows at once. Returns (values, top_ids, ranks) as in PromptRows; nothing waits for
    the device."""
    dev = hidden.device
    values = torch.empty(num_rows, 1 + k, dtype=torch.float32, device=dev)
    top_ids = torch.empty(num_rows, k, dtype=torch.int64, device=dev)
    ranks = torch.empty(num_rows, dtype=torch.int64, device=dev)
    for s in range(0, num_rows, max_rows):
        e = min(num_rows, s + max_rows)
        lp = torch.log_softmax(logits_fn(hidden[rows[s:e]]), dim=-1)  # [e - s, vocab]
        own = lp.gather(1, targets[s:e, None])  # [e - s, 1]
        values[s:e, :1] = own
        ranks[s:e] = (lp > own).sum(dim=-1) + 1
        if k:
            top = lp.topk(k, dim=-1)
            values[s:e, 1:] = top.values
            top_ids[s:e] = top.indices
    return values, top_ids, ranks


def entries(step: PromptRows) -> list[tuple[Request, int, list[TokenLogprob]]]:
    """The host side of a step's rows, read after its event: (request, first position, one entry
    per position from first on, each for the token after it)."""
    values, top_ids, ranks = step.values.tolist(), step.top_ids.tolist(), step.ranks.tolist()
    out, r = [], 0
    for req, first, stop in step.spans:
        k = req.params.prompt_logprobs
        ids = req.prompt_token_ids
        got = []
        for p in range(first, stop):
            got.append(TokenLogprob(ids[p + 1], values[r][0], list(zip(top_ids[r][:k], values[r][1:k + 1])), ranks[r]))
            r += 1
        out.append((req, first, got))
    return out
