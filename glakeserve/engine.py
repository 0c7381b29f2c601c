"""LLMEngine: add requests, step (schedule -> run -> postprocess), read the outputs."""

from __future__ import annotations

import itertools
import os
import random
import time
from dataclasses import dataclass

import torch

from glakeserve import vtensor
from glakeserve.attention import make_backend
from glakeserve.kv_cache import KVCache, KVLayout, aligned_host_page_size
from glakeserve.kv_paged import PagedKVCache
from glakeserve.model.loader import ModelSource, load_model, model_config, resolve_model
from glakeserve.model_runner import ModelRunner
from glakeserve.request import Request, RequestMetrics, RequestOutput
from glakeserve.sampling import SamplingParams
from glakeserve.scheduler import Scheduler
from glakeserve.tokenizer import Tokenizer, detokenize_step

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # float32 on CPU, bfloat16 on a GPU
    max_model_len: int | None = None  # default: the model's context, at most 8192
    max_num_seqs: int | None = None  # default: 16 on CPU, 256 on a GPU
    max_num_batched_tokens: int | None = None  # default: 1024 on CPU, 8192 on a GPU
    kv_cache_memory: float | None = None  # bytes (> 1) or a fraction of free memory (<= 1)
    kv_cache_max_memory: float | None = None  # elastic limit the pool may grow to (default: kv_cache_memory)
    enable_prefix_caching: bool = True  # share KV pages of common prefixes by aliasing (vTensor layouts)
    device: str = "auto"
    seed: int = 0
    load_format: str = "auto"
    kv_layout: str = KVLayout.TOKEN_MAJOR.value
    page_size: int | None = None
    lookahead_tokens: int = 64  # tokens of pages mapped ahead of each running request
    attention_backend: str = "auto"  # auto: triton on a GPU, torch on the CPU
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_max_batch: int = 256  # decode batches up to this size replay CUDA graphs
    check_integrity: bool = False  # check the KV cache's books after every step (tests)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() and vtensor.cuda_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no GPU here: use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        gpu = self.device.type == "cuda"
        if gpu and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.source: ModelSource = resolve_model(config.model, config.load_format)
        self.model_config = cfg = model_config(self.source)
        self.model_name = self.source.name
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 8192)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of "
                             f"{cfg.max_position_embeddings} tokens")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        self.max_num_seqs = config.max_num_seqs or (256 if gpu else 16)
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if gpu else 1024)
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.model = load_model(self.source, self.dtype, self.device, self.max_model_len, config.seed)
        self.tokenizer = Tokenizer(self.source.tokenizer_path) if self.source.tokenizer_path else None
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and self.source.dummy_config is None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        layout = KVLayout(config.kv_layout)
        num_slots = 2 * self.max_num_seqs  # idle slots keep finished requests' pages for reuse
        if layout is KVLayout.PAGED:
            self.pool = None
            self.kv = PagedKVCache(cfg, self.dtype, self.device, self.max_model_len, num_slots,
                                   self._kv_cache_bytes(self._memory_info()))
        else:
            page_size = config.page_size
            if page_size is None and not gpu:  # pages holding whole tokens, so the prefix cache can share them
                per_token = cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
                page_size = aligned_host_page_size(per_token * (2 * cfg.num_layers if layout is KVLayout.TOKEN_MAJOR
                                                                else 1))
            self.pool = vtensor.PagePool(0, page_size=page_size, backend="cuda" if gpu else "host",
                                         device=self.device.index or 0)
            info = self.pool.memory_info()
            pages = self._kv_cache_bytes(info) // self.pool.page_size
            self.pool.grow(pages)
            limit = config.kv_cache_max_memory
            max_pages = int(limit * info[0] if limit <= 1 else limit) // self.pool.page_size if limit else pages
            self.kv = KVCache(self.pool, cfg, self.dtype, self.max_model_len, num_slots=num_slots, layout=layout,
                              lookahead_tokens=config.lookahead_tokens,
                              prefix_caching=config.enable_prefix_caching, max_pages=max_pages)
        self.attn = make_backend(config.attention_backend, self.device, cfg.num_kv_heads)
        self.scheduler = Scheduler(self.kv, self.max_num_seqs, self.max_num_batched_tokens)
        graphs = 0 if config.enforce_eager else min(config.cuda_graph_max_batch, self.max_num_seqs)
        self.runner = ModelRunner(self.model, self.kv, self.attn, self.eos_token_ids, cuda_graph_max_batch=graphs)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "finished": 0}

    def _memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device's memory."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
        except OSError:
            pass
        return free, total

    def _kv_cache_bytes(self, memory_info: tuple[int, int]) -> int:
        setting = self.config.kv_cache_memory
        free, total = memory_info
        if setting is None:
            if self.device.type == "cuda":
                return max(0, int(free - max(1 << 30, 0.1 * total)))
            return int(min(0.1 * free, 1 << 30))
        if setting <= 0:
            raise ValueError(f"kv_cache_memory must be positive (bytes, or a fraction of free memory), got {setting}")
        return int(setting * free) if setting <= 1 else int(setting)

    # ----- requests ---------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer here: pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return None, list(prompt)

    def validate_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> tuple[str | None, list[int]]:
        """Checks a request without touching the engine's state: (prompt text, token ids), or a
        ValueError that says what is wrong."""
        if params is not None and not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if self.source.dummy_config is not None:
            ids = [t % vocab for t in ids]  # dummy shapes borrow SmolLM2's tokenizer: fold its ids in
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: it must be "
                f"shorter than max_model_len so that at least one token can be generated; shorten the prompt "
                f"or raise max_model_len"
            )
        return text, ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, stream: bool = True) -> str:
        """Validates and queues one request; raises ValueError (and changes nothing) when it is bad.
        stream: step() returns an output for it every step, with the new text; else only at the end
        (cheaper: the text is decoded once)."""
        params = params or SamplingParams()
        text, ids = self.validate_request(prompt, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        room = self.max_model_len - len(ids)
        req = Request(
            request_id=request_id, prompt_token_ids=ids, params=params,
            seed=params.seed if params.seed is not None else self._rng.getrandbits(62),
            metrics=RequestMetrics(arrival_time if arrival_time is not None else time.monotonic()),
            max_tokens=min(params.max_tokens or room, room), prompt=text, stream=stream,
            prefix_offset=max(0, len(ids) - 5), read_offset=len(ids),
        )
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        self.requests.pop(request_id, None)
        return self._output(req, "", [])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs = [self._output(r, "", []) for r in batch.failed]
        if not batch.empty:
            sampled = self.runner.execute(batch)
            outputs += self._postprocess(batch, sampled)
        self.scheduler.index_prompts()
        self.scheduler.map_ahead()
        for r in batch.failed:
            self.requests.pop(r.request_id, None)
        self.counters["steps"] += 1
        if self.config.check_integrity:
            self.kv.check_integrity(self.scheduler.tokens_held())
        return outputs

    def _postprocess(self, batch, sampled: dict[str, int]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            self.counters["generation_tokens"] += 1
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
                self.counters["prompt_tokens"] += len(req.prompt_token_ids)
            before = len(req.text)
            incremental = req.stream or bool(req.params.stop)
            if self.tokenizer is not None and incremental:
                new, req.prefix_offset, req.read_offset = detokenize_step(
                    self.tokenizer, req.all_token_ids, req.prefix_offset, req.read_offset,
                    req.params.skip_special_tokens)
                req.text += new
            self._check_stop(req, token, before)
            if req.finished and self.tokenizer is not None and not incremental:
                req.text = self.tokenizer.decode(req.output_token_ids, req.params.skip_special_tokens)
            if req.stream or req.finished:
                outputs.append(self._output(req, None, [token]))
            if req.finished:
                self.requests.pop(req.request_id, None)
                self.counters["finished"] += 1
        return outputs

    def _check_stop(self, req: Request, token: int, text_before: int) -> None:
        p = req.params
        reason, stop_reason = None, None
        if token in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif p.stop:
            start = max(0, text_before - max(len(s) for s in p.stop) + 1)
            hits = [(req.text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                req.text = req.text[: i + len(s)] if p.include_stop_str_in_output else req.text[:i]
                reason, stop_reason = "stop", s
        if reason is None and len(req.output_token_ids) >= req.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(req, reason, stop_reason)

    def _output(self, req: Request, delta_text: str | None, delta_ids: list[int]) -> RequestOutput:
        """delta_text None: compute it. While a request runs, text that could still turn out to
        be the start of a stop string is held back."""
        if delta_text is None:
            hold = 0 if req.finished or not req.params.stop else max(len(s) for s in req.params.stop) - 1
            upto = max(req.emitted, len(req.text) - hold)
            delta_text = req.text[req.emitted:upto]
            req.emitted = upto
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            text=req.text, token_ids=list(req.output_token_ids), finished=req.finished,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason, delta_text=delta_text,
            delta_token_ids=delta_ids, metrics=req.metrics, num_preemptions=req.num_preemptions, error=req.error,
        )

    # ----- inspection -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Live numbers for the CLI and /metrics: pool, slots, mapping waits, preemptions, queues."""
        self.kv.poll()
        tokens = self.scheduler.tokens_held()
        pool = self.kv.pool_stats()
        return {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "kv_layout": self.kv.layout.value,
            "tokens_per_page": self.kv.tokens_per_page(),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "mapping_waits": self.kv.waits,
            "reclaimed_pages": self.kv.reclaimed_pages,
            "prefix_cache": self.kv.prefix_stats(),
            "kv_max_pages": getattr(self.kv, "max_pages", None),
            "pool": pool,
            "slots": self.kv.slot_stats(tokens),
            "kv_pages": self._kv_pages(pool),
            **self.counters,
        }

    def _kv_pages(self, pool: dict) -> dict:
        """Pool pages by who holds them: running requests, only the cache (idle slots and the prefix
        cache: reclaimable at any time, as vLLM counts them), or nobody."""
        per_block = len(self.kv.vtensors) if self.pool is not None else 1  # pages a slot's page index spans
        requests = per_block * sum(s.mapped for s in self.kv.slots[1:] if s.owner is not None)
        used = pool["total_pages"] - pool["free_pages"] - per_block  # the padding slot's page is nobody's
        return {"total": pool["total_pages"], "free": pool["free_pages"], "requests": min(requests, used),
                "cached": max(0, used - requests)}

    def drop_cached_kv(self) -> None:
        """Forgets the KV that idle slots and the prefix cache keep (a chat's /clear): the pages
        become free. Running requests keep theirs."""
        for slot in self.kv.slots[1:]:
            if slot.owner is None and slot.target:
                self.kv.release_slot(slot, keep_pages=False)
        if self.pool is not None and self.kv.prefix is not None:
            self.kv.prefix.clear()

    def memory_snapshot(self) -> dict:
        """PagePool.snapshot() plus the slots: what inspect-memory shows."""
        self.kv.poll()
        snap = self.kv.snapshot()
        snap["slots"] = self.kv.slot_stats(self.scheduler.tokens_held())
        snap["engine"] = {k: v for k, v in self.stats().items() if k not in ("pool", "slots")}
        return snap

    # ----- elasticity -------------------------------------------------------------------------
    def release_idle_memory(self) -> int:
        """With no request in the engine: drops what idle slots keep and the prefix cache (pages
        nobody reads are idle), and gives every free physical page back to the driver. Returns the
        pages released."""
        if self.pool is None or self.scheduler.has_unfinished():
            return 0
        for slot in self.kv.slots[1:]:
            if slot.owner is None and slot.target:
                self.kv.release_slot(slot, keep_pages=False)
        if self.kv.prefix is not None:
            self.kv.prefix.clear()
        self.kv._drain()
        return self.pool.shrink(self.pool.free_pages())

    def set_kv_limit(self, max_bytes: int) -> dict:
        """Sets how far the pool may grow. Lowering it gives back free pages at once (never a page a
        request holds); the rest goes as requests finish and the engine idles."""
        if self.pool is None:
            raise ValueError("the paged baseline has a fixed pool; the limit applies to vTensor layouts")
        pages = int(max_bytes) // self.pool.page_size
        if pages < self.kv.min_pages:
            raise ValueError(f"a KV limit of {int(max_bytes)} bytes ({pages} pages) cannot hold one request of "
                             f"max_model_len={self.max_model_len} tokens, which needs {self.kv.min_pages} pages "
                             f"({self.kv.min_pages * self.pool.page_size} bytes)")
        self.kv.max_pages = pages
        total = self.pool.stats().total_pages
        if total > pages:
            self.kv._drain()
            self.pool.shrink(min(total - pages, self.pool.free_pages()))
        s = self.pool.stats()
        return {"max_pages": pages, "max_bytes": pages * s.page_size, "total_pages": s.total_pages,
                "total_bytes": s.total_pages * s.page_size, "free_pages": s.free_pages}

    def close(self) -> None:
        self.kv.close()
        if self.pool is not None:
            self.pool.close()
