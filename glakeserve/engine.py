"""LLMEngine: add requests, step (schedule -> launch -> update -> outputs), read the outputs.

With async scheduling (the default on a GPU) a step launches the next batch before it reads the
tokens of the batch before: the host schedules, builds inputs and launches while the device still
computes, and reads tokens one step late for stop checks, streaming and bookkeeping. Outputs are
exactly the serial engine's; a request that stops costs at most one extra step of compute.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import asdict, dataclass

import torch

from glakeserve import vtensor
from glakeserve.attention import make_backend
from glakeserve.kv import make_kv_cache
from glakeserve.model.loader import ModelSource, load_model, model_config, resolve_model
from glakeserve.model_runner import LaunchedStep, ModelRunner
from glakeserve.profiling import DeviceTimeline, PhaseClock
from glakeserve.request import Request, RequestMetrics, RequestOutput, RequestStatus
from glakeserve.sampling import SamplingParams
from glakeserve.scheduler import Scheduler
from glakeserve.structured import GrammarBackend, GuidedDecoding
from glakeserve.tokenizer import Tokenizer, detokenize_step

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


PIECEWISE_MAX_TOKENS = 1024  # default cuda_graph_max_tokens


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # float32 on CPU, bfloat16 on a GPU
    max_model_len: int | None = None  # default: the model's context, at most 8192
    max_num_seqs: int | None = None  # default: 16 on CPU, 256 on a GPU (measured best on the H100: RESULTS.md)
    max_num_batched_tokens: int | None = None  # default: 1024 on CPU, 8192 on a GPU
    kv_cache_memory: float | None = None  # bytes (> 1) or a fraction of free memory (<= 1)
    kv_cache_max_memory: float | None = None  # elastic limit the pool may grow to (default: kv_cache_memory)
    enable_prefix_caching: bool = True  # idle slots keep their KV for reuse (vTensor layouts)
    device: str = "auto"
    seed: int = 0
    load_format: str = "auto"
    kv_layout: str = "token-major"  # or page-major, per-layer, paged (the baseline); RESULTS.md compares them
    page_size: int | None = None  # bytes of a KV pool page; default: one that holds at least 16 tokens
    lookahead_tokens: int = 64  # tokens of pages mapped ahead of each running request
    attention_backend: str = "auto"  # auto: triton on a GPU, torch on the CPU
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_max_batch: int | None = None  # decode batches up to this size replay CUDA graphs (default: max_num_seqs)
    # other steps (prefill, mixed) up to this many tokens replay piecewise CUDA graphs with eager attention
    # between them (default: 1,024; 0: eager). One GPU only: not under tensor parallelism
    cuda_graph_max_tokens: int | None = None
    async_scheduling: bool | None = None  # schedule step N+1 while step N runs (default: on a GPU)
    time_gpu_steps: bool = False  # CUDA events around each step: device busy / idle time in stats() (GPU only)
    check_integrity: bool = False  # check the KV cache's books after every step (tests)
    tensor_parallel_size: int = 1  # processes (one device each) the model is split over; kv_cache_memory is per rank
    tensor_parallel_timeout: float = 300.0  # seconds a collective may wait for a rank before the engine stops


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


def start_tensor_parallel(config: EngineConfig, source: ModelSource, cfg, dtype: torch.dtype, device: torch.device,
                          max_model_len: int):
    """Refuses what tensor parallelism does not serve, then starts the other ranks."""
    from glakeserve.distributed.shard import check_tensor_parallel_size
    from glakeserve.distributed.workers import TensorParallel

    size = config.tensor_parallel_size
    check_tensor_parallel_size(cfg, size, source.name)
    if config.kv_layout == "paged":
        raise ValueError("the paged KV baseline serves one device only: use a vTensor kv_layout with "
                         "tensor_parallel_size > 1")
    if source.gguf is not None:
        raise ValueError("load_format gguf runs a GGUF's quantized tensors in one CPU process and does not shard "
                         "them: use load_format auto with tensor_parallel_size > 1")
    if config.time_gpu_steps and device.type != "cuda":  # (checked again later: here before any rank starts)
        raise ValueError("time_gpu_steps times the GPU's work with CUDA events: it needs device cuda")
    from glakeserve.attention import BACKENDS

    if config.attention_backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {config.attention_backend!r}")
    return TensorParallel.start(source, cfg, size, dtype, device, max_model_len, config.seed,
                                config.tensor_parallel_timeout, config.attention_backend)


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
        # ShareGPT on the H100: 256 beat 512 and 1,024 (decode is bound by KV bandwidth there, so a larger
        # batch only lengthens each step; RESULTS.md, 2026-11-26)
        self.max_num_seqs = config.max_num_seqs or (256 if gpu else 16)
        self.max_num_batched_tokens = config.max_num_batched_tokens or (8192 if gpu else 1024)
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if config.cuda_graph_max_tokens is not None and config.cuda_graph_max_tokens < 0:
            raise ValueError(f"cuda_graph_max_tokens must be 0 (off) or a token count, got {config.cuda_graph_max_tokens}")
        self.tp = None  # distributed.workers.TensorParallel: the other ranks, when there are any
        kv_cfg, pool_class = cfg, vtensor.PagePool
        if config.tensor_parallel_size == 1:
            self.model = load_model(self.source, self.dtype, self.device, self.max_model_len, config.seed)
        else:
            self.tp = start_tensor_parallel(config, self.source, cfg, self.dtype, self.device, self.max_model_len)
            self.model, kv_cfg, pool_class = self.tp.model, self.tp.kv_config, self.tp.pool_class
        self.tokenizer = Tokenizer(self.source.tokenizer_path) if self.source.tokenizer_path else None
        eos = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and self.source.dummy_config is None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        try:
            self.kv = make_kv_cache(config.kv_layout, kv_cfg, self.dtype, self.device, self.max_model_len,
                                    num_slots=2 * self.max_num_seqs,  # idle slots keep finished requests' KV
                                    memory=config.kv_cache_memory, max_memory=config.kv_cache_max_memory,
                                    page_size=config.page_size, prefix_caching=config.enable_prefix_caching,
                                    lookahead_tokens=config.lookahead_tokens, pool_class=pool_class)
            if self.tp is not None:
                self.tp.attach_kv(self.kv)  # every other rank builds a pool of the same size
            self.attn = make_backend(config.attention_backend, self.device, kv_cfg.num_kv_heads)
            self.scheduler = Scheduler(self.kv, self.max_num_seqs, self.max_num_batched_tokens, self.eos_token_ids)
            # decode CUDA graphs (GPU only); under tensor parallelism every rank captures and replays them
            graphs = 0 if config.enforce_eager else min(config.cuda_graph_max_batch or self.max_num_seqs,
                                                        self.max_num_seqs)
            # up to 1,024 tokens by default: a longer step's kernels outlast their launches, so graphs would
            # only add capture time (8,192: 21 s of start-up for llama-3-8b, no faster; RESULTS.md)
            pieces = min(PIECEWISE_MAX_TOKENS if config.cuda_graph_max_tokens is None else config.cuda_graph_max_tokens,
                         self.max_num_batched_tokens)
            pieces = 0 if config.enforce_eager or config.tensor_parallel_size > 1 else pieces
            if config.time_gpu_steps and not gpu:
                raise ValueError("time_gpu_steps times the GPU's work with CUDA events: it needs device cuda")
            self.clock = PhaseClock()
            self.timeline = DeviceTimeline() if config.time_gpu_steps else None
            self.runner = ModelRunner(self.model, self.kv, self.attn, self.eos_token_ids, cuda_graph_max_batch=graphs,
                                      clock=self.clock, timeline=self.timeline, tp=self.tp,
                                      cuda_graph_max_tokens=pieces)
        except BaseException as e:
            if self.tp is not None:  # no rank outlives a failed start
                self.tp.close(error=e)
            raise
        self.async_scheduling = gpu if config.async_scheduling is None else config.async_scheduling
        self._in_flight: LaunchedStep | None = None
        self.last_path = ""  # "graph" or "eager": how the last launched step ran
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "finished": 0}
        self._grammar: GrammarBackend | None = None  # made on the first guided request
        self._grammar_lock = threading.Lock()

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
        if params is not None:
            if params.top_k > vocab:
                raise ValueError(f"top_k must be at most the vocabulary size ({vocab}), got {params.top_k}; use 0 "
                                 f"or -1 to turn top-k off")
            out_of_vocab = [t for t in params.stop_token_ids if t >= vocab]
            if out_of_vocab:
                raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {out_of_vocab[:5]}")
            if params.guided is not None:
                self.compile_guided(params.guided)
            out_of_vocab = [t for t in params.logit_bias if t >= vocab]
            if out_of_vocab:
                raise ValueError(f"logit_bias keys must be token ids in [0, {vocab}), got {out_of_vocab[:5]}")
        return text, ids

    def compile_guided(self, guided: GuidedDecoding):
        """The compiled grammar (cached by spec), or a ValueError naming what cannot be compiled.
        Safe to call from another thread (the server's tokenizer thread does)."""
        with self._grammar_lock:
            if self._grammar is None:
                if self.tokenizer is None:
                    raise ValueError("guided decoding needs the model's tokenizer, and this model has none")
                self._grammar = GrammarBackend(self.tokenizer.hf, self.model_config.vocab_size, self.eos_token_ids)
        return self._grammar.compile(guided)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None, stream: bool = True,
                    share_prompt_of: str | None = None, index: int = 0) -> str:
        """Validates and queues one sequence; raises ValueError (and changes nothing) when it is bad.
        stream: step() returns an output for it every step, with the new text; else only at the end
        (cheaper: the text is decoded once). A request with n > 1 is n calls, one per
        params.for_sequence(i) with index i: sequences after the first name the first's id in
        share_prompt_of, and wait for its prompt to be launched, then share its KV pages."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"add_request adds one sequence, got n={params.n}: add each of the n with "
                             f"params.for_sequence(i) (LLM.generate does)")
        text, ids = self.validate_request(prompt, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        first = self.requests.get(share_prompt_of) if share_prompt_of is not None else None
        room = self.max_model_len - len(ids)
        req = Request(
            request_id=request_id, prompt_token_ids=ids, params=params,
            seed=params.seed if params.seed is not None else self._rng.getrandbits(62),
            metrics=RequestMetrics(arrival_time if arrival_time is not None else time.monotonic()),
            max_tokens=min(params.max_tokens or room, room), prompt=text, stream=stream,
            prefix_offset=max(0, len(ids) - 5), read_offset=len(ids), index=index,
            share_prompt_of=first if first is not None and first.prompt_token_ids == ids else None,
            matcher=self._grammar.matcher(params.guided) if params.guided is not None else None,
        )
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends a request wherever it is; its output carries the text generated so far."""
        req = self.scheduler.abort(request_id)
        if req is None:
            return None
        self.requests.pop(request_id, None)
        if self.tokenizer is not None and not (req.stream or req.params.stop):  # its text is decoded at the end
            req.text = self.tokenizer.decode(req.output_token_ids, req.params.skip_special_tokens)
        return self._output(req, None, [])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> launch -> update -> outputs. With async scheduling the tokens read are the
        previous launch's: this step's batch was scheduled before they were known. A grammar's next
        mask needs its request's last token: with a constrained request sampling, the step's forward
        is launched, the step in flight is read (the matchers advance while the device computes),
        and then the step's sampling is launched."""
        self.clock.start()
        outputs = []
        batch = self.scheduler.schedule()
        self.clock.lap("schedule")
        outputs += [self._output(r, "", []) for r in batch.failed]
        for r in batch.failed:
            self.requests.pop(r.request_id, None)
        launched = None
        if not batch.empty:
            defer = self.async_scheduling and any(r.matcher is not None for r in batch.samplers)
            launched = self.runner.launch(batch, defer_sampling=defer)
            self.last_path = launched.path
        if self.async_scheduling:
            if self._in_flight is not None:
                outputs += self._update(self._in_flight)
            if launched is not None and launched.logits is not None:
                self.runner.sample_deferred(launched)
            self._in_flight = launched
        elif launched is not None:
            outputs += self._update(launched)
        self.counters["steps"] += 1
        if self.config.check_integrity:
            self.kv.check_integrity(self.scheduler.tokens_held())
            if self.tp is not None:
                self.tp.check_integrity(self.kv)
        self.clock.lap("other")
        return outputs

    def _update(self, step: LaunchedStep) -> list[RequestOutput]:
        tokens, logprobs, prompt = self.runner.read(step)
        for req, first, entries in prompt:  # before the outputs: the first one carries them
            assert len(req.prompt_logprobs) == first + 1, "prompt logprob rows out of order"
            req.prompt_logprobs += entries
        got = self.scheduler.update(step.batch, tokens, logprobs)
        for req in got:  # each grammar moves past its request's token (the next mask depends on it)
            if req.matcher is not None and not req.matcher.accept_token(req.output_token_ids[-1]):
                error = f"the grammar rejected token {req.output_token_ids[-1]}, which its mask allowed"
                if req.status is not RequestStatus.FINISHED:
                    self.scheduler.finish(req, "abort", error=error)
        self.clock.lap("update")
        outputs = self._postprocess(got)
        self.clock.lap("postprocess")
        return outputs

    def _postprocess(self, got: list[Request]) -> list[RequestOutput]:
        """Counters, detokenization, stop strings and outputs for the requests that got a token."""
        outputs = []
        now = time.monotonic()
        for req in got:
            token = req.output_token_ids[-1]
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
            if not req.finished and req.params.stop:
                self._check_stop_strings(req, before)
            if req.finished and self.tokenizer is not None and not incremental:
                req.text = self.tokenizer.decode(req.output_token_ids, req.params.skip_special_tokens)
            if req.stream or req.finished:
                outputs.append(self._output(req, None, [token]))
            if req.finished:
                self.requests.pop(req.request_id, None)
                self.counters["finished"] += 1
        return outputs

    def _check_stop_strings(self, req: Request, text_before: int) -> None:
        p = req.params
        start = max(0, text_before - max(len(s) for s in p.stop) + 1)
        hits = [(req.text.find(s, start), s) for s in p.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            req.text = req.text[: i + len(s)] if p.include_stop_str_in_output else req.text[:i]
            self.scheduler.finish(req, "stop", s)

    def _output(self, req: Request, delta_text: str | None, delta_ids: list[int]) -> RequestOutput:
        """delta_text None: compute it. While a request runs, text that could still turn out to
        be the start of a stop string is held back."""
        if delta_text is None:
            hold = 0 if req.finished or not req.params.stop else max(len(s) for s in req.params.stop) - 1
            upto = max(req.emitted, len(req.text) - hold)
            delta_text = req.text[req.emitted:upto]
            req.emitted = upto
        wants_logprobs = req.params.logprobs is not None
        prompt_logprobs = req.prompt_logprobs if req.params.prompt_logprobs is not None and \
            len(req.prompt_logprobs) == len(req.prompt_token_ids) else None  # (an abort may leave them short)
        return RequestOutput(
            request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            text=req.text, token_ids=list(req.output_token_ids), finished=req.finished,
            finish_reason=req.finish_reason, stop_reason=req.stop_reason, delta_text=delta_text,
            delta_token_ids=delta_ids, metrics=req.metrics, num_preemptions=req.num_preemptions, error=req.error,
            num_cached_tokens=req.num_cached_tokens, index=req.index,
            logprobs=list(req.output_logprobs) if wants_logprobs and (req.finished or not req.stream) else None,
            delta_logprobs=req.output_logprobs[len(req.output_logprobs) - len(delta_ids):] if wants_logprobs else None,
            prompt_logprobs=prompt_logprobs,
        )

    # ----- inspection -------------------------------------------------------------------------
    def stats(self, ranks: bool = True) -> dict:
        """Live numbers for the CLI, the server and the benchmarks: one read-only call.
        ranks: every rank's pool too under tensor parallelism (a round trip to every rank, which
        waits for its last step; a benchmark's timeline leaves it out)."""
        kv = self.kv.stats()
        prefix = None
        if kv.prefix is not None:
            prefix = {**asdict(kv.prefix), "cached_pages": kv.cached_pages, "tokens_per_page": kv.tokens_per_block,
                      "evicted": kv.prefix.evicted_blocks}
        return {
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "kv_layout": kv.layout,
            "attention": {"backend": self.attn.name, **self.attn.stats()},
            "tokens_per_page": kv.tokens_per_block,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "async_scheduling": self.async_scheduling,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "running_tokens": sum(r.num_computed_tokens for r in self.scheduler.running),
            "preemptions": self.scheduler.num_preemptions,
            "mapping_waits": kv.mapping_waits,
            "engine_driver_calls": kv.engine_driver_calls,
            "reclaimed_pages": kv.reclaimed_pages,
            "prefix_cache": prefix,
            "prefix_cache_disabled": kv.prefix_disabled_reason,
            "kv_max_pages": kv.max_pages,
            "kv_bytes_per_token": self.kv.kv_bytes_per_token(),
            "kv_reserved_pages_per_slot": self.kv.blocks_for(self.max_model_len) * kv.pages_per_block,
            "last_path": self.last_path,
            "phase_seconds": dict(self.clock.seconds),  # the engine thread's time by phase
            "device_timeline": self.timeline.stats() if self.timeline is not None else None,
            "pool": kv.pool,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "rank_pools": self.tp.rank_pools() if self.tp is not None and ranks else None,  # every rank's pool, rank 0 first
            "slots": self.kv.slot_stats(self.scheduler.tokens_held()),
            "kv_pages": {"total": kv.total_pages, "free": kv.free_pages, "requests": kv.request_pages,
                         "cached": kv.cached_pages},
            **self.counters,
        }

    def memory_snapshot(self) -> dict:
        """The pool's state plus the slots: what inspect-memory shows."""
        snap = self.kv.snapshot()
        stats = self.stats()
        snap["slots"] = stats["slots"]
        snap["engine"] = {k: v for k, v in stats.items() if k not in ("pool", "slots")}
        return snap

    # ----- the KV pool's life -----------------------------------------------------------------
    def drop_cached_kv(self) -> None:
        """Forgets the KV that idle slots keep (a chat's /clear): the pages become free. Running
        requests keep theirs."""
        self.kv.drop_cached()

    def release_idle_memory(self) -> int:
        """With no request in the engine: drops what idle slots keep and gives every free physical
        page back to the device. Returns the pages released."""
        if self.scheduler.has_unfinished():
            return 0
        return self.kv.release_idle()

    def set_kv_limit(self, max_bytes: int) -> dict:
        """Sets how far the pool may grow. Lowering it gives back free pages at once (never a page a
        request holds); the rest goes as requests finish and the engine idles."""
        return self.kv.set_limit(max_bytes)

    def close(self) -> None:
        """Ends the engine: every rank stopped and every pool given back, also after an error."""
        step, self._in_flight = self._in_flight, None
        try:
            if step is not None and (self.tp is None or not self.tp.failed):
                self.runner.read(step)
        finally:
            try:
                try:
                    self.runner.close()
                finally:
                    self.kv.close()
            finally:
                if self.tp is not None:
                    self.tp.close()
