"""SamplingParams (vLLM's fields, validated with messages that name the field, the value and the
allowed range) and the batch sampler.

Sampling is one pass over each row of logits (Gumbel-max): the token is
    argmax_v  logits[v] / temperature - log(-log u(seed, step, v))
which picks v with its softmax probability, needs no softmax, and is exact greedy argmax at
temperature 0. The noise u is a counter-based hash of (request seed, output step, token id): no
generator state, so a seeded request samples the same tokens whatever else is in its batch, after a
preemption, and on CPU or GPU alike; and nothing forces a host sync. On a GPU the pass is one Triton
kernel (sampling_kernel.py); on a CPU its torch twin below computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from glakeserve.penalties import PenaltyRows
from glakeserve.structured import GuidedDecoding


MAX_LOGPROBS = 20  # top logprobs per token, at most (OpenAI's limit)
MAX_N = 128  # sequences per request, at most


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI's)
    logprobs: int | None = None  # the sampled token's logprob and the top N's (0-20); None: none
    # each prompt token's logprob given the tokens before it, and the top N's (0-20); None: none. Raw:
    # log_softmax of the model's logits (no bias, penalties or temperature), as vLLM's; the first token has none
    prompt_logprobs: int | None = None
    guided: GuidedDecoding | None = None  # output constrained to a JSON schema, any JSON, a regex or a choice

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            fail(f"n must be an integer in [1, {MAX_N}], got {self.n}.")
        if not self.temperature >= 0.0:
            fail(f"temperature must be non-negative (0 means greedy), got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            fail(f"top_k must be -1 or 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}.")
        if not self.repetition_penalty > 0.0:
            fail(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            fail(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            fail(f"seed must be in [0, 2**63), got {self.seed}.")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            fail(f"stop must be non-empty strings, got {self.stop!r}.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            fail(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}.")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            fail(f"logprobs must be in [0, {MAX_LOGPROBS}] (top tokens besides the sampled one) or None, got "
                 f"{self.logprobs}.")
        plp = self.prompt_logprobs
        if plp is not None and (isinstance(plp, bool) or not isinstance(plp, int) or not 0 <= plp <= MAX_LOGPROBS):
            fail(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] (top tokens besides the prompt token) or "
                 f"None, got {plp!r}.")
        if self.guided is not None:
            if not isinstance(self.guided, GuidedDecoding):
                fail(f"guided must be a GuidedDecoding, got {type(self.guided).__name__}.")
            if self.ignore_eos or self.min_tokens:
                fail("guided decoding ends where its grammar does: it cannot be combined with ignore_eos or "
                     "min_tokens.")
        for t, v in self.logit_bias.items():
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                fail(f"logit_bias keys must be non-negative token ids, got {t!r}.")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100.0 <= v <= 100.0:
                fail(f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {t}.")

    def for_sequence(self, i: int) -> SamplingParams:
        """The params of sequence i of n: n = 1, and a given seed becomes seed + i (so the n
        sequences differ under sampling and each is reproducible)."""
        seed = None if self.seed is None else (self.seed + i) % 2**63
        return replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# ----- counter-based randomness ------------------------------------------------------------------
# murmur3's 32-bit finalizer over a Weyl sequence of token ids: a few integer operations per logit,
# the same on the host (int64 tensors masked to 32 bits) and in the Triton kernel (uint32).
M32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 of int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (seed, step) row: int64 seeds below 2**63, int64 steps."""
    lo, hi = seeds & M32, (seeds >> 32) & M32
    return mix32((mix32(lo ^ mix32(hi)) + steps * GOLDEN32) & M32)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[batch, vocab] floats in (0, 1), a pure function of (seed, step, token id)."""
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = mix32((row_keys(seeds, steps)[:, None] + tok[None, :] * GOLDEN32) & M32)
    return bits_to_uniform(bits)


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits -> a float32 strictly inside (0, 1): the top 23 bits, centred. (With 24 bits the
    largest value, 2**24 - 0.5, rounds up to 2**24 in float32: u = 1 made the Gumbel noise +inf, so
    a token cut to -inf could come out as NaN and win the argmax.)"""
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_argmax_torch(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor,
                        steps: torch.Tensor) -> torch.Tensor:
    """The sampling pass in torch: rows with temperature 0 take argmax, the others argmax of
    logits / temperature plus Gumbel noise."""
    u = uniform_noise(seeds, steps, logits.shape[1])
    keys = logits / temps.clamp_min(1e-30)[:, None] - torch.log(-torch.log(u))
    greedy = (temps == 0)[:, None]
    return torch.where(greedy, logits, keys).argmax(dim=-1)


# ----- the sampler ------------------------------------------------------------------------------
@dataclass
class SamplingBatch:
    """What the sampler needs of each request, in batch order."""

    params: list[SamplingParams]
    seeds: list[int]
    steps: list[int]  # output tokens before this one = the step's counter
    penalties: PenaltyRows | None = None  # the rows whose request uses penalties, with their token counts
    banned: list[list[int]] = field(default_factory=list)  # token ids to forbid now (min_tokens)
    mask_rows: list[int] = field(default_factory=list)  # rows constrained by a grammar
    token_bitmask: torch.Tensor | None = None  # [len(mask_rows), ceil(vocab / 32)] int32 on the device: allowed tokens


def _apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams], to_device) -> None:
    """Adds each request's sparse bias to its row, in one scatter on the logits' device."""
    rows, cols, values = [], [], []
    for i, p in enumerate(params):
        rows += [i] * len(p.logit_bias)
        cols += p.logit_bias.keys()
        values += p.logit_bias.values()
    logits.index_put_((to_device(rows, torch.int64), to_device(cols, torch.int64)),
                      to_device(values, torch.float32), accumulate=True)


def _filter(logits: torch.Tensor, params: list[SamplingParams], to_device) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p on the tempered distribution; -inf where a token is
    cut. Greedy rows are left untempered (their argmax survives every cut)."""
    if any(p.temperature not in (0.0, 1.0) for p in params):
        temps = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32)
        logits = logits / temps[:, None]
    V = logits.shape[1]
    top_ks = [min(p.top_k, V) if p.top_k > 0 else V for p in params]
    if any(k < V for k in top_ks):
        k = to_device(top_ks, torch.int64)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = to_device([p.top_p for p in params], torch.float32)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        cut_sorted = before >= top_p[:, None]  # the top token is always kept
        cut = torch.zeros_like(cut_sorted).scatter(1, order, cut_sorted)
        logits = logits.masked_fill(cut, float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32)
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def needs_filter(p: SamplingParams) -> bool:
    return p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)


@dataclass
class Sampled:
    """What a sampling pass leaves on the device. Logprobs are *processed* ones (vLLM's term): the
    log-softmax of the logits after logit bias, penalties, bans and temperature, before the top-k,
    top-p and min-p cuts; they cover only the rows whose request asked for them."""

    tokens: torch.Tensor  # [batch] int64
    logprob_rows: list[int] = field(default_factory=list)  # batch rows with logprobs, in order
    logprobs: torch.Tensor | None = None  # [rows, 1 + k] float32: the sampled token's, then the top k's
    top_ids: torch.Tensor | None = None  # [rows, k] int64: the k most likely tokens, best first


def sample(logits: torch.Tensor, b: SamplingBatch, to_device=None) -> torch.Tensor:
    """logits [batch, vocab] float32 -> token ids [batch] (int64, on the logits' device)."""
    return sample_with_logprobs(logits, b, to_device).tokens


def sample_with_logprobs(logits: torch.Tensor, b: SamplingBatch, to_device=None) -> Sampled:
    """The tokens and, for the requests that set `logprobs`, their logprobs; nothing waits for the
    device. to_device(values, dtype) makes the small per-request tensors (the GPU runner stages them
    so that nothing waits); by default, torch.tensor. A batch with no logit bias, penalties, bans,
    top-k, top-p or min-p takes one pass over its logits; the others are filtered first. Order:
    logit bias, penalties, bans (min_tokens), grammar masks, then temperature and the cuts."""
    dev = logits.device
    if to_device is None:
        def to_device(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

    logits = _process(logits, b, to_device)
    tokens = _pick(logits, b, to_device)
    rows = [i for i, p in enumerate(b.params) if p.logprobs is not None]
    if not rows:
        return Sampled(tokens)
    k = max(b.params[i].logprobs for i in rows)
    if len(rows) < len(b.params):
        index = to_device(rows, torch.int64)
        logits, chosen = logits[index], tokens[index]
    else:
        chosen = tokens
    temps = to_device([b.params[i].temperature or 1.0 for i in rows], torch.float32)
    lp = torch.log_softmax(logits.float() / temps[:, None], dim=-1)  # [rows, vocab]
    values = lp.gather(1, chosen[:, None])
    top_ids = None
    if k:
        top = lp.topk(k, dim=-1)
        values, top_ids = torch.cat([values, top.values], dim=1), top.indices
    return Sampled(tokens, rows, values, top_ids)


def _process(logits: torch.Tensor, b: SamplingBatch, to_device) -> torch.Tensor:
    """Logit bias, penalties, bans and grammar masks, on a copy (the logits of a batch without them are returned as
    they are)."""
    if any(p.logit_bias for p in b.params) or (b.penalties and b.penalties.rows) or any(b.banned) or b.mask_rows:
        logits = logits.clone()
        if any(p.logit_bias for p in b.params):
            _apply_logit_bias(logits, b.params, to_device)
        if b.penalties is not None and b.penalties.rows:
            b.penalties.apply(logits, b.params, to_device)
        for i, banned in enumerate(b.banned):
            if banned:
                logits[i, banned] = float("-inf")
        if b.mask_rows:
            _apply_token_bitmask(logits, b.mask_rows, b.token_bitmask, to_device)
    return logits


def _apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, to_device) -> None:
    """-inf for every token a row's grammar does not allow now: bit j of word w allows token 32w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :logits.shape[1]]  # [rows, vocab]
    index = to_device(rows, torch.int64)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _pick(logits: torch.Tensor, b: SamplingBatch, to_device) -> torch.Tensor:
    """Temperature, the cuts, and the Gumbel-max pass."""
    dev = logits.device
    if any(needs_filter(p) for p in b.params):
        logits = _filter(logits, b.params, to_device)  # tempered: the pass samples at temperature 1
        temps = [0.0 if p.greedy else 1.0 for p in b.params]
    else:
        temps = [p.temperature for p in b.params]
    temps_t = to_device(temps, torch.float32)
    seeds = to_device(b.seeds, torch.int64)
    steps = to_device(b.steps, torch.int64)
    if dev.type == "cuda":
        from glakeserve.sampling_kernel import gumbel_argmax

        return gumbel_argmax(logits, temps_t, seeds, steps)
    return gumbel_argmax_torch(logits, temps_t, seeds, steps)
