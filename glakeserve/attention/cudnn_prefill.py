"""Long prefills through cuDNN's fused attention (the kernel behind torch's SDPA on Hopper), reading
the vTensor slots in place: no gather, no block table.

cuDNN's graph API describes K and V as [batch, kv_heads, positions, dim] with any strides, plus a
*ragged offset* per batch row: the element offset of that row's first position. A row's offset is
its slot id times the cache's slot stride, so the kernel reads `k_cache[slot, :context]` of a
token-major or per-layer vTensor exactly where it lies. Q and O are the step's packed tokens, also
addressed by ragged offsets (each row's first token). Causality is aligned to the bottom right:
query j of a row with n new tokens and c in context sees positions <= c - n + j. Lengths are
device tensors, so one built graph serves every batch that fits its (rows, query, context) bucket,
each a power of two: padding rows have zero lengths.

Which kernel is faster depends on the shape (benchmarks/kernels.py): cuDNN from queries of about a
thousand tokens on, our Triton kernel for shorter ones. The backend asks `wanted()`.

Needs the `nvidia-cudnn-frontend` package (scripts/setup.sh installs it on a GPU machine, without
its optional code generators: only the graph API over the cuDNN library that torch ships is used).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import triton

from glakeserve.attention.base import AttentionMetadata

MIN_QUERY = 1024  # the longest new-token run from which cuDNN beats the Triton kernel (kernels.py)
WARM_ROWS = (1, 2, 4, 8)  # row buckets built at start-up; larger ones on first use


def available() -> bool:
    return importlib.util.find_spec("cudnn") is not None


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above max(n, least)."""
    return triton.next_power_of_2(max(n, least))


def fits(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None) -> bool:
    """Shapes cuDNN's kernel takes here: 16-bit [slot, pos, kv_head, dim] caches (not the paged
    baseline, not page-major), head dims up to 128 in multiples of 8, 16-byte aligned strides."""
    return (block_table is None and k_cache.dim() == 4 and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k_cache.dtype == q.dtype and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
            and q.shape[1] % k_cache.shape[2] == 0
            and all(s % 8 == 0 for s in (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), q.stride(0)))
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1 and (q.data_ptr() | k_cache.data_ptr()) % 16 == 0)


class CudnnPrefill:
    """Built graphs by shape bucket, one cuDNN handle, one workspace; `attend` for a step's
    extend rows. Counts the graphs built after warm-up (each a ~0.1 s pause while serving)."""

    def __init__(self, device: torch.device, min_query: int = MIN_QUERY):
        if not available():
            raise ValueError("cuDNN prefill needs the nvidia-cudnn-frontend package: pip install --no-deps "
                             "nvidia-cudnn-frontend (scripts/setup.sh does it on a GPU machine), or use "
                             "--attention-backend triton")
        import cudnn

        self.cudnn = cudnn
        self.device = device
        self.min_query = min_query
        with torch.cuda.device(device):
            self.handle = cudnn.create_handle()
        self.graphs: dict[tuple, tuple] = {}
        self.workspace = torch.empty(1, dtype=torch.uint8, device=device)
        self.warmed = False
        self.built_while_serving = 0
        self.steps = 0  # steps whose extend rows took cuDNN

    def close(self) -> None:
        """Drops the graphs and destroys the handle (idempotent); the backend must not run after."""
        self.graphs.clear()
        if self.handle is not None:
            self.cudnn.destroy_handle(self.handle)
            self.handle = None

    def wanted(self, q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        return meta.max_extend_query_len >= self.min_query and fits(q, k_cache, meta.block_table)

    # ----- graphs ---------------------------------------------------------------------------------
    def _graph(self, dtype, rows, heads, kv_heads, dim, q_len, kv_len, q_tok, o_tok, k_head, k_tok):
        key = (dtype, rows, heads, kv_heads, dim, q_len, kv_len, q_tok, o_tok, k_head, k_tok)
        hit = self.graphs.get(key)
        if hit is None:
            hit = self.graphs[key] = self._build(*key)
            if self.warmed:
                self.built_while_serving += 1
            if hit[2] > self.workspace.numel():
                self.workspace = torch.empty(hit[2], dtype=torch.uint8, device=self.device)
        return hit

    def _build(self, dtype, rows, heads, kv_heads, dim, q_len, kv_len, q_tok, o_tok, k_head, k_tok):
        cd = self.cudnn
        io = cd.data_type.HALF if dtype == torch.float16 else cd.data_type.BFLOAT16
        g = cd.pygraph(handle=self.handle, io_data_type=io, intermediate_data_type=cd.data_type.FLOAT,
                       compute_data_type=cd.data_type.FLOAT)
        # [row, head, position, dim]; the row stride is never used (the ragged offsets replace it)
        q = g.tensor(name="q", dim=[rows, heads, q_len, dim], stride=[q_len * q_tok, dim, q_tok, 1], data_type=io)
        kv_dims = dict(dim=[rows, kv_heads, kv_len, dim], stride=[kv_len * k_tok, k_head, k_tok, 1], data_type=io)
        k = g.tensor(name="k", **kv_dims)
        v = g.tensor(name="v", **kv_dims)
        column = dict(dim=[rows, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cd.data_type.INT32)
        q_lens, kv_lens = g.tensor(name="q_lens", **column), g.tensor(name="kv_lens", **column)
        ragged = dict(dim=[rows + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cd.data_type.INT64)
        q_off, o_off, kv_off = (g.tensor(name=n, **ragged) for n in ("q_off", "o_off", "kv_off"))
        q.set_ragged_offset(q_off)
        k.set_ragged_offset(kv_off)
        v.set_ragged_offset(kv_off)
        o, _ = g.sdpa(name="prefill", q=q, k=k, v=v, generate_stats=False, attn_scale=1 / math.sqrt(dim),
                      use_padding_mask=True, seq_len_q=q_lens, seq_len_kv=kv_lens,
                      diagonal_alignment=cd.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0)
        o.set_output(True).set_dim([rows, heads, q_len, dim]).set_stride([q_len * o_tok, dim, o_tok, 1])
        o.set_data_type(io).set_ragged_offset(o_off)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cd.heur_mode.A, cd.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        uids = [t.uid for t in (q, k, v, o, q_lens, kv_lens, q_off, o_off, kv_off)]
        return g, uids, g.get_workspace_size()

    def warm_up(self, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, k_cache: torch.Tensor) -> None:
        """Builds, before serving, the graphs of a model's steps (q the fused projection's view,
        [tokens, heads + 2 kv_heads, dim]; out packed): WARM_ROWS rows, every query bucket from
        min_query to the slots' length, every context bucket from there."""
        longest = bucket(k_cache.shape[1])
        q_tok, o_tok = (heads + 2 * kv_heads) * dim, heads * dim
        q_len = bucket(self.min_query)
        while q_len <= longest:
            kv_len = q_len
            while kv_len <= longest:
                for rows in WARM_ROWS:
                    self._graph(dtype, rows, heads, kv_heads, dim, q_len, kv_len, q_tok, o_tok, k_cache.stride(2),
                                k_cache.stride(1))
                kv_len *= 2
            q_len *= 2
        self.warmed = True

    # ----- a step ---------------------------------------------------------------------------------
    def _step_columns(self, meta: AttentionMetadata, n: int, rows: int, q_tok: int, o_tok: int, c_slot: int):
        """Per-step lengths and offsets of the extend rows (those after n leading decodes), padded
        to `rows`: made once, on the device, and shared by every layer."""
        key = ("cudnn", n, rows, q_tok, o_tok, c_slot)
        cols = meta.scratch.get(key)
        if cols is None:
            real = meta.query_lens.shape[0] - n
            dev = meta.query_lens.device
            q_lens = torch.zeros(rows, 1, 1, 1, dtype=torch.int32, device=dev)
            kv_lens = torch.zeros_like(q_lens)
            q_lens[:real, 0, 0, 0] = meta.query_lens[n:]
            kv_lens[:real, 0, 0, 0] = meta.context_lens[n:]
            starts = torch.empty(rows + 1, 1, 1, 1, dtype=torch.int64, device=dev)
            starts[:real + 1, 0, 0, 0] = meta.query_start[n:]
            starts[real + 1:] = starts[real]  # padding rows start (empty) where the last one ends
            kv_off = torch.zeros_like(starts)
            kv_off[:real, 0, 0, 0] = meta.slot_ids[n:] * c_slot
            cols = meta.scratch[key] = (q_lens, kv_lens, starts * q_tok, starts * o_tok, kv_off)
            self.steps += 1
        return cols

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               n: int, out: torch.Tensor) -> None:
        """Attention of the extend rows (after n leading decodes) into their tokens of `out`."""
        if self.handle is None:
            raise RuntimeError("this cuDNN prefill was closed (its engine was closed)")
        if (out.stride(-1) != 1 or out.stride(0) % 8 or k_cache.stride() != v_cache.stride()
                or (out.data_ptr() | v_cache.data_ptr()) % 16):
            raise ValueError(f"cuDNN prefill needs a packed, 16-byte aligned output and K, V caches with equal "
                             f"strides; got out {out.stride()}, K {k_cache.stride()}, V {v_cache.stride()}")
        tokens, heads, dim = q.shape
        rows = bucket(meta.query_lens.shape[0] - n)
        q_len = bucket(meta.max_extend_query_len, self.min_query)
        kv_len = bucket(max(meta.context_lens_host[n:]), q_len)
        g, uids, _ = self._graph(q.dtype, rows, heads, k_cache.shape[2], dim, q_len, kv_len, q.stride(0),
                                 out.stride(0), k_cache.stride(2), k_cache.stride(1))
        cols = self._step_columns(meta, n, rows, q.stride(0), out.stride(0), k_cache.stride(0))
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(q.device).cuda_stream)
        g.execute([q, k_cache, v_cache, out, *cols], self.workspace, handle=self.handle, tensor_uids=uids)
