"""Piecewise CUDA graphs for the steps a decode graph cannot hold: prefills, chunked prefills and
mixed prefill+decode batches (and decode batches above the decode graphs' largest size).

Launched one by one from Python, such a step's ~430 kernels took longer to queue than to run on the
H100 (33.8 ms span for 18.8 ms of kernels, `benchmarks/step_gaps.py`). Attention is the only part
whose launches depend on the batch's make-up (how many sequences, how long their queries are); the
rest depends on the token count alone. So for each of a set of token counts (buckets) the forward is
captured as a chain of graphs, one per stretch between two attentions:

    piece 0       embed, norm, layer 0's qkv + rope + KV store
    piece i       layer i-1's output projection + MLP + norms, layer i's qkv + rope + KV store
    piece L       the last layer's output projection + MLP + the final norm

and a step replays the chain of the smallest bucket that holds its tokens, running each layer's
attention eagerly in between (over the real tokens only, with the step's own metadata) into a
fixed buffer the next piece reads. Padding tokens have id 0 at position 0 of the padding slot, like
the decode graphs' padding rows; their rows are computed and dropped.

The pieces are LlamaModel's own (begin, project_qkv, store_kv, attend, finish_layer), so the chain
computes what model.forward computes, in the same order. On the CPU (tests) a piece is run again on
the same buffers instead of replayed (PieceRerun), which checks the chain's plumbing there too.
Not under tensor parallelism (the other ranks run the eager forward).
"""

from __future__ import annotations

import gc

import torch

from glakeserve.attention.base import AttentionBackend, AttentionMetadata
from glakeserve.kv import KVCache
from glakeserve.model.llama import LlamaModel


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture: every 16 up to 128, then every 128 up to 2,048, every 256 up to
    4,096 and every 512 beyond (a GEMM's row tiles are 64-128 rows, so rounding a count up to the
    next multiple of 128 costs little of its time), and max_tokens itself."""
    sizes, t = [], 16
    while t < max_tokens:
        sizes.append(t)
        t += 16 if t < 128 else 128 if t < 2048 else 256 if t < 4096 else 512
    return sizes + [max_tokens]


class PieceRerun:
    """The CPU's stand-in for one piece's graph: replay() runs the piece again and copies its fresh
    results into the tensors captured the first time (the ones the next pieces read)."""

    def __init__(self, piece, captured: dict[str, torch.Tensor]):
        self.piece, self.captured = piece, captured

    def replay(self) -> None:
        for name, value in self.piece().items():
            if value is not self.captured[name]:
                self.captured[name].copy_(value)


class MixedGraphs:
    def __init__(self, model: LlamaModel, kv: KVCache, attn: AttentionBackend, max_tokens: int,
                 last_token: torch.Tensor):
        self.model, self.kv, self.attn = model, kv, attn
        self.sizes = token_buckets(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.last_token = last_token
        cfg, dev = model.cfg, model.device
        self.cuda = dev.type == "cuda"
        self.pad_slot = kv.padding_slot()
        # written by the host before a replay: token ids, positions, token slots
        self.inputs = torch.zeros(3, self.max_tokens, dtype=torch.int64, device=dev)
        # what passes from piece to piece lives in fixed buffers shared by every bucket and layer (a
        # chain's own tensors for each would hold layers x buckets of them): layer i's q, k, v for its
        # attention, which writes attn_out for piece i + 1 (its real rows only: padding rows keep what an
        # earlier step left, harmless because every op in a piece works row by row); the residual stream;
        # the final hidden states
        T = self.max_tokens
        like = dict(dtype=model.dtype, device=dev)
        self.qkv = torch.zeros(T, cfg.num_heads + 2 * cfg.num_kv_heads, cfg.head_dim, **like)
        self.attn_out = torch.zeros(T, cfg.num_heads, cfg.head_dim, **like)
        self.residual = torch.zeros(T, cfg.hidden_size, **like)
        self.hidden = torch.zeros(T, cfg.hidden_size, **like)
        # per bucket: each piece's graph (or PieceRerun) and the tensors it captured
        self.chains: dict[int, list[tuple[object, dict[str, torch.Tensor]]]] = {}

    def size_for(self, tokens: int) -> int:
        if tokens > self.max_tokens:
            raise ValueError(f"{tokens} tokens: the piecewise graphs hold at most {self.max_tokens} (run it eagerly)")
        return next(s for s in self.sizes if s >= tokens)

    def _store_meta(self, t: int) -> AttentionMetadata:
        """The metadata store_kv reads inside a piece: the fixed slot and position buffers."""
        slots, positions = self.inputs[2, :t], self.inputs[1, :t]
        one = torch.ones(1, dtype=torch.int64, device=slots.device)
        return AttentionMetadata(slot_ids=one, query_lens=one, context_lens=one, query_start=one, token_slots=slots,
                                 positions=positions, query_lens_host=[], context_lens_host=[], slot_ids_host=[],
                                 max_query_len=t, max_context_len=1, block_table=self.kv.block_table)

    def _piece(self, j: int, t: int, state: dict[str, torch.Tensor], meta: AttentionMetadata) -> dict:
        """Piece j of the chain for t tokens (see the module's docstring), reading `state` (the
        tensors the pieces before it captured); returns the tensors it makes (the rope tables, and
        views of the fixed buffers: the CPU's rerun copies a fresh result into them)."""
        model, residual = self.model, self.residual[:t]
        if j == 0:
            ids = self.inputs[0, :t]
            ids = torch.where(ids >= 0, ids, self.last_token[self.inputs[2, :t]])  # -1: sampled, not read yet
            x, first, (cos, sin) = model.begin(ids, self.inputs[1, :t])
            residual.copy_(first)
            made = {"cos": cos, "sin": sin}
        else:
            x, res = model.finish_layer(j - 1, self.attn_out[:t], residual)
            made = {"residual": res if res is residual else residual.copy_(res)}  # in place on a GPU
        if j == len(model.layers):
            made["hidden"] = self.hidden[:t].copy_(x)
            return made
        rope = (made.get("cos", state.get("cos")), made.get("sin", state.get("sin")))
        made["qkv"] = qkv = model.project_qkv(j, x, rope, out=self.qkv[:t])
        model.store_kv(j, qkv, self.kv, self.attn, meta)
        return made

    @torch.inference_mode()
    def capture(self) -> None:
        self.inputs[2].fill_(self.pad_slot)
        if not self.cuda:
            for t in reversed(self.sizes):
                self.chains[t] = self._capture_chain(t, None)
            return
        gc.collect()  # once, not before each of the ~1,300 graphs
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for t in reversed(self.sizes):  # largest first: the smaller chains fit in its memory
                self.chains[t] = self._capture_chain(t, (pool, stream))
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _capture_chain(self, t: int, cuda) -> list:
        meta = self._store_meta(t)
        n = len(self.model.layers) + 1
        # compiles the Triton kernels, outside any graph: once is enough, as no kernel in a piece takes the
        # token count as an argument (it only sets the grid); the smallest and largest buckets, to be sure
        if cuda is not None and t in (self.sizes[0], self.sizes[-1]):
            state: dict[str, torch.Tensor] = {}
            for j in range(n):
                state.update(self._piece(j, t, state, meta))
        state, chain = {}, []
        for j in range(n):  # piece j reads what the pieces before it captured: a snapshot of state
            if cuda is None:
                made = self._piece(j, t, state, meta)
                runner = PieceRerun(lambda j=j, seen=state: self._piece(j, t, seen, meta), made)
            else:  # as torch.cuda.graph does, less its sync, empty_cache (and gc, in older torch) a graph
                runner = torch.cuda.CUDAGraph()
                runner.capture_begin(pool=cuda[0])
                try:
                    made = self._piece(j, t, state, meta)
                finally:
                    runner.capture_end()
            state = {**state, **made}
            chain.append((runner, made))
        return chain

    def run(self, staging, ids: list[int], meta: AttentionMetadata) -> torch.Tensor:
        """The hidden states [tokens, hidden] of a step's tokens `ids` (-1: the token the step before
        sampled) under its metadata; queued on the device, nothing waits."""
        t = len(ids)
        size = self.size_for(t)
        self.inputs[0, :size].copy_(staging.put(ids + [0] * (size - t), torch.int64))
        self.inputs[1, :t].copy_(meta.positions)
        self.inputs[2, :t].copy_(meta.token_slots)
        if size > t:  # padding: token 0 at position 0 of the padding slot
            self.inputs[1, t:size].zero_()
            self.inputs[2, t:size].fill_(self.pad_slot)
        chain = self.chains[size]
        model, out = self.model, self.attn_out[:t]
        for j, (runner, made) in enumerate(chain):
            runner.replay()
            if "qkv" in made:
                model.attend(j, made["qkv"][:t], self.kv, self.attn, meta, out=out)
        return chain[-1][1]["hidden"][:t]

    def release(self) -> None:
        for chain in self.chains.values():
            for runner, _ in chain:
                if isinstance(runner, torch.cuda.CUDAGraph):
                    runner.reset()
        self.chains.clear()
