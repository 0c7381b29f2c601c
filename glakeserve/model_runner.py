"""One forward pass for a scheduled batch: inputs and metadata in, sampled token ids out.

On a GPU nothing in a step waits for the device until the sampled tokens are read: inputs go
through pinned buffers and non-blocking copies (HostStaging), decode-only steps replay a CUDA graph
captured for the padded batch size (DecodeGraphs), and the tokens come back through a recorded event.
"""

from __future__ import annotations

import torch

from glakeserve.attention.base import AttentionBackend, AttentionMetadata
from glakeserve.model.llama import LlamaModel
from glakeserve.request import Request
from glakeserve.sampling import SamplingBatch, sample
from glakeserve.scheduler import ScheduledBatch


class HostStaging:
    """Device tensors from Python lists without a host sync. Buffers are reused every step: the
    previous step's copies are complete by then (its tokens were read through an event)."""

    def __init__(self, device: torch.device, capacity: int = 1 << 20):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.ints = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            self.floats = torch.empty(capacity, dtype=torch.float32, pin_memory=True)
            self.result = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
            self.event = torch.cuda.Event()
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

    def read(self, t: torch.Tensor) -> list[int]:
        if not self.cuda:
            return t.tolist()
        host = self.result[: t.numel()]
        host.copy_(t, non_blocking=True)
        self.event.record()
        self.event.synchronize()  # the one wait of a step: the tokens decide the next step
        return host.tolist()


class DecodeGraphs:
    """CUDA graphs of the decode forward for a set of batch sizes. The KV views never move (vTensor
    slots, or the paged baseline's fixed tensors), so a graph stays valid as requests come and go;
    a batch is padded up to the next captured size with rows that point at the padding slot."""

    def __init__(self, model: LlamaModel, kv, attn: AttentionBackend, max_batch: int, max_model_len: int):
        self.model, self.kv, self.attn = model, kv, attn
        sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
        self.sizes = sorted(set(sizes))
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        dev = model.device
        self.inputs = torch.zeros(4, self.max_batch, dtype=torch.int64, device=dev)  # ids, positions, slots, lens
        self.pad_slot = kv.padding_slot().index
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        _, positions, slots, lens = self.inputs[:, :b]
        ones = torch.ones(b, dtype=torch.int64, device=slots.device)
        return AttentionMetadata(
            slot_ids=slots, query_lens=ones, context_lens=lens, query_start=torch.arange(b + 1, device=slots.device),
            token_slots=slots, positions=positions, query_lens_host=[1] * b, context_lens_host=[1] * b,
            slot_ids_host=[self.pad_slot] * b, max_query_len=1, max_context_len=self.max_model_len,
            block_table=self.kv.block_table, num_splits=self.attn.decode_splits(b, self.max_model_len),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        self.inputs[2].fill_(self.pad_slot)
        self.inputs[3].fill_(1)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):  # largest first: the smaller ones fit in its memory
                meta = self._meta(b)
                self.model.forward(self.inputs[0, :b], self.inputs[1, :b], self.kv, self.attn, meta)  # compiles
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = self.model.forward(self.inputs[0, :b], self.inputs[1, :b], self.kv, self.attn, meta)
                self.graphs[b] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def run(self, staging: HostStaging, ids: list[int], slots: list[int], lens: list[int]) -> torch.Tensor:
        b = len(ids)
        size = next(s for s in self.sizes if s >= b)
        pad = size - b
        values = (ids + [0] * pad) + ([n - 1 for n in lens] + [0] * pad) + (slots + [self.pad_slot] * pad) + (
            lens + [1] * pad)
        self.inputs[:, :size].copy_(staging.put(values, torch.int64).view(4, size))
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:b]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv, attn: AttentionBackend, eos_token_ids: tuple[int, ...],
                 cuda_graph_max_batch: int = 0):
        self.model = model
        self.kv = kv
        self.attn = attn
        self.device = model.device
        self.eos_token_ids = eos_token_ids
        self.staging = HostStaging(self.device)
        self.last_path = ""  # "graph" or "eager": how the last step ran (benchmarks break time down by it)
        self.graphs = None
        if cuda_graph_max_batch and self.device.type == "cuda" and attn.supports_cuda_graphs:
            self.graphs = DecodeGraphs(model, kv, attn, cuda_graph_max_batch, kv.max_model_len)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[str, int]:
        """Runs the model over the batch's new tokens; returns {request_id: sampled token} for the
        requests whose known tokens are now all computed (the others are mid-prefill)."""
        self.staging.reset()
        self.kv.flush()
        ids, slots, qlens, ctxs = [], [], [], []
        samplers: list[Request] = []
        last_index = []  # index into the flat token list of each sampling request's last token
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed_tokens
            ids += req.token_ids(start, n)
            slots.append(req.slot.index)
            qlens.append(n)
            ctxs.append(start + n)
            if start + n == req.num_tokens:
                samplers.append(req)
                last_index.append(len(ids) - 1)
        if self.graphs is not None and len(ids) == len(slots) <= self.graphs.max_batch:
            hidden = self.graphs.run(self.staging, ids, slots, ctxs)  # decode: one token per sequence
            self.last_path = "graph"
        else:
            self.last_path = "eager"
            meta = self.attn.prepare_metadata(slots, qlens, ctxs, self.device, block_table=self.kv.block_table,
                                              to_device=self.staging.put)
            hidden = self.model.forward(self.staging.put(ids, torch.int64), meta.positions, self.kv, self.attn, meta)
        if not samplers:
            return {}
        rows = hidden if len(last_index) == hidden.shape[0] else hidden[self.staging.put(last_index, torch.int64)]
        logits = self.model.logits(rows)
        tokens = self.staging.read(sample(logits, self.sampling_batch(samplers), to_device=self.staging.put))
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
