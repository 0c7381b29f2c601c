"""One forward pass for a scheduled batch: launch() queues it on the device and returns at once;
read() returns its sampled tokens. Between the two the host can schedule and launch the next step.

On a GPU nothing in launch() waits for the device: inputs go through pinned buffers and non-blocking
copies (HostStaging, two sets used in turn so that a step in flight keeps its own), decode-only steps
replay a CUDA graph captured for the padded batch size (DecodeGraphs), other steps a chain of
piecewise graphs with eager attention in between (mixed_graphs.py), sampling runs on the device,
and the tokens come back through a recorded event. A token the host has not read yet enters the next
step as -1: the device takes it from `last_token`, where each slot's latest sampled token is kept.

Under tensor parallelism (tp: rank 0's distributed.workers.TensorParallel) every rank captures the
same decode graphs, with their collectives, in the same order, and replays the size rank 0 replays;
read() waits through tp.wait, which notices a rank that died while rank 0's device waits for it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from glakeserve import sampling_kernel
from glakeserve.attention.base import AttentionBackend, AttentionMetadata
from glakeserve.kv import KVCache
from glakeserve.mixed_graphs import MixedGraphs
from glakeserve.model.llama import LlamaModel
from glakeserve.penalties import PenaltyCounts
from glakeserve.profiling import DeviceTimeline, PhaseClock
from glakeserve.prompt_logprobs import PromptRows, chunk_rows, compute, entries
from glakeserve.request import TokenLogprob
from glakeserve.sampling import Sampled, SamplingBatch, sample_with_logprobs
from glakeserve.scheduler import ScheduledBatch


class HostStaging:
    """Device tensors from Python lists without a host sync, through pinned buffers reused every
    other step (the step that used them last has completed by then: its tokens were read)."""

    def __init__(self, device: torch.device, capacity: int = 1 << 20):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.ints = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            self.floats = torch.empty(capacity, dtype=torch.float32, pin_memory=True)
            self.result = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.used_ints = self.used_floats = 0

    def reset(self) -> None:
        self.used_ints = self.used_floats = 0

    def put(self, values, dtype: torch.dtype) -> torch.Tensor:
        if not self.cuda:
            return torch.tensor(values, dtype=dtype)
        floating = dtype.is_floating_point
        buf, used = (self.floats, self.used_floats) if floating else (self.ints, self.used_ints)
        n = len(values)
        if used + n > buf.numel():  # too big for the staging area: a plain (synchronous) copy
            return torch.tensor(values, dtype=dtype, device=self.device)
        host = buf[used:used + n]
        host.numpy()[:] = values
        if floating:
            self.used_floats += n
        else:
            self.used_ints += n
        dev = host.to(self.device, non_blocking=True)
        return dev if dev.dtype == dtype else dev.to(dtype)


def resolve_pending(ids: torch.Tensor, token_slots: torch.Tensor, last_token: torch.Tensor) -> torch.Tensor:
    """-1 marks a token sampled by the step before, not read on the host yet: take it from last_token."""
    return torch.where(ids >= 0, ids, last_token[token_slots])


class DecodeGraphs:
    """CUDA graphs of the decode forward for a set of batch sizes. The KV views never move (vTensor
    slots, or the paged baseline's fixed tensors), so a graph stays valid as requests come and go;
    a batch is padded up to the next captured size with rows that point at the padding slot.

    tp (rank 0's TensorParallel; model is then rank 0's shard): the other ranks capture the same
    sizes in the same order (each capture's collectives pair with theirs: NCCL requires it), and
    each replay is announced to them first. A rank's graphs must be gone before its communicator
    (release()). On the CPU (tests) a "graph" runs the forward again on the same input buffers
    (Rerun), so that the replay protocol of tensor parallelism runs there too."""

    def __init__(self, model: LlamaModel, kv: KVCache, attn: AttentionBackend, max_batch: int, last_token: torch.Tensor,
                 tp=None):
        self.model, self.kv, self.attn, self.tp = model, kv, attn, tp
        sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.last_token = last_token
        dev = model.device
        self.cuda = dev.type == "cuda"
        self.inputs = torch.zeros(4, self.max_batch, dtype=torch.int64, device=dev)  # ids, positions, slots, lens
        self.pad_slot = kv.padding_slot()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if tp is not None:
            tp.before_abort.append(self.release)

    def size_for(self, batch: int) -> int:
        """The captured size a decode batch of `batch` sequences is padded to."""
        return next(s for s in self.sizes if s >= batch)

    def _meta(self, b: int) -> AttentionMetadata:
        _, positions, slots, lens = self.inputs[:, :b]
        ones = torch.ones(b, dtype=torch.int64, device=slots.device)
        # a CUDA graph cannot read host values; Rerun (CPU) runs eagerly and gives the real ones
        host_slots, host_lens = (slots.tolist(), lens.tolist()) if not self.cuda else ([self.pad_slot] * b, [1] * b)
        return AttentionMetadata(
            slot_ids=slots, query_lens=ones, context_lens=lens, query_start=torch.arange(b + 1, device=slots.device),
            token_slots=slots, positions=positions, query_lens_host=[1] * b, context_lens_host=host_lens,
            slot_ids_host=host_slots, max_query_len=1, max_context_len=self.kv.max_model_len,
            block_table=self.kv.block_table, num_splits=self.attn.decode_splits(b, self.kv.max_model_len),
        )

    def _forward(self, b: int, meta: AttentionMetadata) -> torch.Tensor:
        ids = resolve_pending(self.inputs[0, :b], self.inputs[2, :b], self.last_token)
        return self.model.forward(ids, self.inputs[1, :b], self.kv, self.attn, meta)  # under TP: rank 0's ids

    def _issuing(self):
        return self.tp.issuing() if self.tp is not None else nullcontext()

    @torch.inference_mode()
    def capture(self) -> None:
        if self.tp is not None:
            self.tp.start_graphs(self.max_batch)
        self.inputs[2].fill_(self.pad_slot)
        self.inputs[3].fill_(1)
        if not self.cuda:
            for b in reversed(self.sizes):
                graph = Rerun(lambda b=b: self._forward(b, self._meta(b)))
                with self._issuing():
                    self.graphs[b] = (graph, graph.capture())
        else:
            self._capture_cuda()
        if self.tp is not None:
            self.tp.graphs_ready(self.sizes)

    def _capture_cuda(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first: the smaller ones fit in its memory
                meta = self._meta(b)
                with self._issuing():
                    self._forward(b, meta)  # compiles; under TP, pairs each collective once outside a graph
                if self.tp is not None:  # those collectives done before the capture begins, waiting as read() does
                    self.tp.wait(stream.record_event())
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    with self._issuing():
                        hidden = self._forward(b, meta)
                self.graphs[b] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        if self.tp is not None:
            self.tp.wait(torch.cuda.current_stream().record_event())
        torch.cuda.synchronize()

    def run(self, staging: HostStaging, ids: list[int], slots: list[int], lens: list[int]) -> torch.Tensor:
        b = len(ids)
        size = self.size_for(b)
        pad = size - b
        values = (ids + [0] * pad) + ([n - 1 for n in lens] + [0] * pad) + (slots + [self.pad_slot] * pad) + (
            lens + [1] * pad)
        self.inputs[:, :size].copy_(staging.put(values, torch.int64).view(4, size))
        graph, hidden = self.graphs[size]
        if self.tp is not None:
            self.tp.replay(graph, size, slots, lens)
        else:
            graph.replay()
        return hidden[:b]

    def release(self) -> None:
        """Destroys the graphs (the collectives they hold keep an NCCL communicator from going);
        a second call finds none."""
        for graph, _ in self.graphs.values():
            graph.reset()
        self.graphs.clear()


class Rerun:
    """The CPU's stand-in for a CUDA graph (tests): replay() runs the captured forward again, on the
    same input buffers, into the same output tensor."""

    def __init__(self, forward):
        self.forward = forward
        self.out: torch.Tensor | None = None

    def capture(self) -> torch.Tensor:
        self.out = self.forward()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.forward())

    def reset(self) -> None:
        pass


def decode_graphs_supported(device: torch.device, attn: AttentionBackend) -> bool:
    return device.type == "cuda" and attn.supports_cuda_graphs


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """A device tensor copied into fresh pinned memory without waiting (the copy lands by the step's
    event); on the CPU, the tensor itself."""
    if t is None or t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


@dataclass
class LaunchedStep:
    """A step queued on the device: read() waits for `event` and returns the tokens."""

    batch: ScheduledBatch
    tokens: torch.Tensor | None  # sampled ids: pinned host memory on a GPU; None when nothing sampled
    event: torch.cuda.Event | None
    path: str  # "graph" (decode graph), "piecewise" (mixed_graphs.py) or "eager"
    start: torch.cuda.Event | None = None  # with a DeviceTimeline: the step's device work starts here
    logprobs: Sampled | None = None  # the samplers' logprobs (pinned host copies on a GPU), when asked for
    prompt: PromptRows | None = None  # prompt logprob rows (pinned host copies on a GPU), when asked for
    staging: HostStaging | None = None  # the staging buffers of its launch
    logits: torch.Tensor | None = None  # the samplers' logits while their sampling is deferred
    sampler_slots: list[int] | None = None  # each sampler's slot at launch (a deferred one may have left it since)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, attn: AttentionBackend, eos_token_ids: tuple[int, ...],
                 cuda_graph_max_batch: int = 0, clock: PhaseClock | None = None,
                 timeline: DeviceTimeline | None = None, tp=None, cuda_graph_max_tokens: int = 0):
        """tp: rank 0's distributed.workers.TensorParallel (model is then its RankModel), or None.
        cuda_graph_max_tokens: other steps up to this many tokens replay piecewise graphs
        (mixed_graphs.py; one GPU, no tensor parallelism); 0: they run eagerly."""
        self.model = model
        self.tp = tp
        self.clock = clock or PhaseClock()
        self.timeline = timeline
        self.kv = kv
        self.attn = attn
        self.device = model.device
        self.eos_token_ids = eos_token_ids
        self.staging = [HostStaging(self.device), HostStaging(self.device)]
        self._turn = 0
        self.last_token = torch.zeros(kv.num_slots, dtype=torch.int64, device=self.device)  # per slot
        self.penalties: PenaltyCounts | None = None  # made when a request first uses penalties
        self.graphs = None
        if self.device.type == "cuda":  # compile what serving selects now (rank 0 samples for all ranks)
            attn.warm_up(kv.k_cache(0), kv.v_cache(0), model.cfg.num_heads, kv.padding_slot(), kv.block_table)
            sampling_kernel.warm_up(model.cfg.vocab_size, self.device)
        if cuda_graph_max_batch and decode_graphs_supported(self.device, attn):
            self.graphs = DecodeGraphs(model if tp is None else tp.model.shard, kv, attn, cuda_graph_max_batch,
                                       self.last_token, tp=tp)
            self.graphs.capture()
        self.mixed = None
        if cuda_graph_max_tokens and tp is None and decode_graphs_supported(self.device, attn):
            self.mixed = MixedGraphs(model, kv, attn, cuda_graph_max_tokens, self.last_token)
            self.mixed.capture()

    def close(self) -> None:
        """Destroys the decode and piecewise graphs: their memory pool goes now, not when garbage
        collection finds them, and before the KV pool their kernels address; then closes the
        attention backend (cuDNN's handle)."""
        try:
            for graphs in (self.graphs, self.mixed):
                if graphs is not None:
                    graphs.release()
            self.graphs = self.mixed = None
        finally:
            self.attn.close()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, defer_sampling: bool = False) -> LaunchedStep:
        """Queues the model over the batch's new tokens and the sampling of its samplers' next tokens;
        with defer_sampling, the forward and the logits only: sample_deferred() queues the rest."""
        staging = self.staging[self._turn]
        self._turn ^= 1
        staging.reset()
        started = self.timeline.mark() if self.timeline is not None else None
        self.kv.begin_step(batch)
        self.clock.lap("kv_begin")
        ids, slots, qlens, ctxs = [], [], [], []
        last_index = []  # index into the flat token list of each sampler's last token
        offsets = []  # index into the flat token list of each request's first new token
        samplers = batch.samplers  # in batch order
        for req, n, start in zip(batch.requests, batch.num_new_tokens, batch.starts):
            offsets.append(len(ids))
            ids += req.token_ids(start, n)
            slots.append(req.slot.index)
            qlens.append(n)
            ctxs.append(start + n)
            if len(last_index) < len(samplers) and samplers[len(last_index)] is req:
                last_index.append(len(ids) - 1)
        if self.graphs is not None and len(ids) == len(slots) <= self.graphs.max_batch:
            hidden = self.graphs.run(staging, ids, slots, ctxs)  # decode: one token per sequence
            path = "graph"
        else:
            meta = self.attn.prepare_metadata(slots, qlens, ctxs, self.device, block_table=self.kv.block_table,
                                              to_device=staging.put)
            if self.mixed is not None and len(ids) <= self.mixed.max_tokens:
                path = "piecewise"
                hidden = self.mixed.run(staging, ids, meta)
            else:
                path = "eager"
                tokens = resolve_pending(staging.put(ids, torch.int64), meta.token_slots, self.last_token)
                hidden = self.model.forward(tokens, meta.positions, self.kv, self.attn, meta)
        logits = None
        if batch.samplers:
            rows = hidden if len(last_index) == hidden.shape[0] else hidden[staging.put(last_index, torch.int64)]
            logits = self.model.logits(rows)
        prompt = self._prompt_rows(batch, hidden, offsets, staging) if batch.prompt_rows else None
        step = LaunchedStep(batch, None, None, path, started, prompt=prompt, staging=staging,
                            sampler_slots=[r.slot.index for r in batch.samplers])
        if defer_sampling and logits is not None:
            # the step's KV work is queued: the cache's end-of-step work needs only that much
            step.logits = logits
            self.clock.lap("launch")
            self.kv.end_step(batch, self._record())
            self.clock.lap("kv_end")
            return step
        self._sample(step, logits)
        step.event = self._record()
        self.clock.lap("launch")
        self.kv.end_step(batch, step.event)
        self.clock.lap("kv_end")
        return step

    @torch.inference_mode()
    def sample_deferred(self, step: LaunchedStep) -> None:
        """Queues the sampling of a step launched with defer_sampling, now that the host state it
        depends on (grammar matchers advanced by the step before) is known."""
        self._sample(step, step.logits)
        step.logits = None
        step.event = self._record()
        self.clock.lap("sample")

    def _record(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = DeviceTimeline.mark() if self.timeline is not None else torch.cuda.Event()
        event.record()
        return event

    def _sample(self, step: LaunchedStep, logits: torch.Tensor | None) -> None:
        """The samplers' next tokens (and logprobs) from their logits, into the step."""
        if logits is None:
            return
        batch, staging = step.batch, step.staging
        sampling = self.sampling_batch(batch, logits.shape[1], staging.put)
        result = sample_with_logprobs(logits, sampling, to_device=staging.put)
        out = result.tokens
        if sampling.penalties is not None:
            rows = sampling.penalties.rows
            self.penalties.add_sampled([batch.samplers[i] for i in rows], out[staging.put(rows, torch.int64)],
                                       staging.put)
        self.last_token.index_copy_(0, staging.put(step.sampler_slots, torch.int64), out)
        if staging.cuda:
            step.tokens = staging.result[:out.numel()]
            step.tokens.copy_(out, non_blocking=True)
        else:
            step.tokens = out
        if result.logprobs is not None:
            step.logprobs = Sampled(step.tokens, result.logprob_rows, _to_host(result.logprobs),
                                    _to_host(result.top_ids))

    def _prompt_rows(self, batch: ScheduledBatch, hidden: torch.Tensor, offsets: list[int],
                     staging: HostStaging) -> PromptRows:
        """Queues the prompt logprob rows the scheduler planned (batch.prompt_rows) and their copies
        to the host."""
        rows, targets, spans = [], [], []
        for i, first, stop in batch.prompt_rows:
            req, start = batch.requests[i], batch.starts[i]
            rows += range(offsets[i] + first - start, offsets[i] + stop - start)
            targets += req.prompt_token_ids[first + 1:stop + 1]
            spans.append((req, first, stop))
        k = max(req.params.prompt_logprobs for req, _, _ in spans)
        values, top_ids, ranks = compute(self.model.logits, hidden, staging.put(rows, torch.int64),
                                         staging.put(targets, torch.int64), len(rows), k,
                                         chunk_rows(self.model.cfg.vocab_size))
        return PromptRows(spans, _to_host(values), _to_host(top_ids), _to_host(ranks))

    def read(self, step: LaunchedStep) -> tuple[list[int], list[TokenLogprob | None], list]:
        """The step's sampled tokens, one per sampler, their logprobs (None for a sampler that did not
        ask), and its prompt logprobs: (request, first position, entries) per request with rows in
        the step. Waits for the device: the one wait of a step."""
        if step.event is not None:
            if self.tp is not None:
                self.tp.wait(step.event)  # notices a rank that died (NCCL would wait for it forever)
            else:
                step.event.synchronize()
            if step.start is not None:
                self.timeline.add(step.start, step.event)
        self.clock.lap("gpu_wait")
        tokens = [] if step.tokens is None else step.tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        if step.logprobs is not None:
            lp = step.logprobs
            values = lp.logprobs.tolist()
            top_ids = lp.top_ids.tolist() if lp.top_ids is not None else [[] for _ in values]
            for row, vals, ids in zip(lp.logprob_rows, values, top_ids):
                k = step.batch.samplers[row].params.logprobs
                logprobs[row] = TokenLogprob(tokens[row], vals[0], list(zip(ids[:k], vals[1:k + 1])))
        return tokens, logprobs, entries(step.prompt) if step.prompt is not None else []

    def sampling_batch(self, batch: ScheduledBatch, vocab: int, to_device) -> SamplingBatch:
        reqs = batch.samplers
        banned = []
        for r, step in zip(reqs, batch.sample_steps):
            if step < r.params.min_tokens:
                banned.append(list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(self.eos_token_ids)))
            else:
                banned.append([])
        # (a request finished meanwhile drops its token: its grammar, perhaps complete, is not asked)
        mask_rows = [i for i, r in enumerate(reqs) if r.matcher is not None and not r.finished]
        bitmask = None
        if mask_rows:  # the grammars' allowed tokens, filled on the host, copied without waiting
            words = (self.model.cfg.vocab_size + 31) // 32
            host = torch.empty((len(mask_rows), words), dtype=torch.int32, pin_memory=self.device.type == "cuda")
            for j, i in enumerate(mask_rows):
                reqs[i].matcher.fill_next_token_bitmask(host, j)
            bitmask = host.to(self.device, non_blocking=True)
        penalties = None
        penalty_rows = [i for i, r in enumerate(reqs) if r.params.uses_penalties and not r.finished]
        if penalty_rows:
            if self.penalties is None:
                self.penalties = PenaltyCounts(vocab, self.device)
            penalties = self.penalties.rows_for(penalty_rows, [reqs[i] for i in penalty_rows], to_device)
        return SamplingBatch(
            params=[r.params for r in reqs],
            seeds=[r.seed for r in reqs],
            steps=list(batch.sample_steps),
            penalties=penalties,
            banned=banned,
            mask_rows=mask_rows,
            token_bitmask=bitmask,
        )
