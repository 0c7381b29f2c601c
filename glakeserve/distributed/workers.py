"""Rank 0's handle on the other ranks (TensorParallel, RankModel) and their process (worker_main).
The design and the protocol are in distributed/__init__.py."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from glakeserve.distributed.group import TPGroup, nccl_environment
from glakeserve.distributed.journal import JournaledPagePool, Replayer, books_for_check
from glakeserve.distributed.shard import TPShard, check_tensor_parallel_size
from glakeserve.model.config import ModelConfig


class TensorParallelError(RuntimeError):
    """A rank failed or stopped answering; the engine cannot go on (close it and start anew)."""


@dataclass(frozen=True)
class RankSpec:
    """What a spawned rank needs to build its part (picklable)."""

    source: object  # loader.ModelSource
    model_config: ModelConfig
    dtype: torch.dtype
    device: torch.device  # rank 0's; rank r uses the device r places after it
    max_model_len: int
    seed: int
    size: int
    timeout_s: float
    store_file: str
    attention_backend: str


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU from rank 0's, always with its index (NCCL binds to it)."""
    if device.type == "cpu":
        return device
    first = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", first + rank)


# ----- rank 0 --------------------------------------------------------------------------------
class TensorParallel:
    """Starts ranks 1..N-1, joins them in one process group with rank 0, and speaks for them:
    every message to them goes through here, and every failure of theirs comes out of here as a
    TensorParallelError naming the rank."""

    pool_class = JournaledPagePool

    def __init__(self, spec: RankSpec, store_dir: str):
        self.spec, self.size, self.timeout_s = spec, spec.size, spec.timeout_s
        self.store_dir = store_dir
        self.procs, self.conns = {}, {}
        self.group: TPGroup | None = None
        self.model: RankModel | None = None
        self.pool: JournaledPagePool | None = None
        self.error: BaseException | None = None
        self.closing = self.closed = False
        # One thread issues collectives at a time: rank 0's engine thread, or the watcher while it
        # aborts the communicator (NCCL's rule: one thread at a time on a communicator).
        self.lock = threading.RLock()
        self.lost = False  # the watcher saw a rank's process end and aborted the communicator
        self.aborted = False
        self._abort_lock = threading.Lock()
        self.before_abort: list = []  # callables: CUDA graphs holding collectives go before the communicator
        self._watcher: threading.Thread | None = None

    @classmethod
    def start(cls, source, cfg: ModelConfig, size: int, dtype: torch.dtype, device: torch.device, max_model_len: int,
              seed: int, timeout_s: float, attention_backend: str) -> TensorParallel:
        from glakeserve.model.loader import load_model

        check_tensor_parallel_size(cfg, size, source.name)
        if not timeout_s > 0:
            raise ValueError(f"tensor_parallel_timeout must be positive seconds, got {timeout_s}")
        if device.type == "cuda":
            device = rank_device(device, 0)
            first = device.index
            if first + size > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size={size} needs GPUs {first}..{first + size - 1}, but torch sees "
                                 f"{torch.cuda.device_count()} GPU(s) here")
            nccl_environment()  # spawned ranks inherit it
        store_dir = tempfile.mkdtemp(prefix="glake-tp-")
        spec = RankSpec(source, cfg, dtype, device, max_model_len, seed, size, timeout_s,
                        os.path.join(store_dir, "store"), attention_backend)
        tp = cls(spec, store_dir)
        try:
            tp._spawn()
            tp._expect("hello")  # each rank runs; the group's rendezvous would not notice a rank that never came
            tp.group = TPGroup(TPShard.plan(cfg, size, 0), spec.store_file, rank_device(device, 0), timeout_s)
            tp.model = RankModel(load_model(source, dtype, device, max_model_len, seed, tp=tp.group), tp)
            tp._expect("ready")
            tp._watcher = threading.Thread(target=tp._watch, name="glake-tp-watcher", daemon=True)
            tp._watcher.start()
        except BaseException as e:
            tp._fail(e)
            tp.close()
            raise tp.error from e
        return tp

    def _spawn(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(rank, self.spec, child, os.getpid()),
                               name=f"glake-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.procs[rank], self.conns[rank] = proc, parent

    @property
    def kv_config(self) -> ModelConfig:
        return self.model.cfg

    def attach_kv(self, kv) -> None:
        """Rank 0's KV cache is built: the other ranks build theirs of exactly its size, and rank 0's
        pool records its page operations from now on."""
        self.pool = kv.pool
        if not isinstance(self.pool, JournaledPagePool):
            raise TypeError("tensor parallelism needs rank 0's KV pool to be a JournaledPagePool")
        ps = self.pool.page_size
        args = {"layout": kv.layout.value, "cfg": kv.cfg, "dtype": kv.dtype, "max_model_len": kv.max_model_len,
                "num_slots": kv.num_slots - 1, "memory": kv.books.total_pages * ps, "max_memory": kv.max_pages * ps,
                "page_size": ps, "prefix_caching": False, "lookahead_tokens": kv.lookahead_tokens}
        self.pool.record_from_now(kv.vtensors)
        self.pool.on_shrink = self.flush
        self.send(("kv", args))
        self._expect("kv-ready")

    # ----- messages ---------------------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        self._check()
        try:
            for conn in self.conns.values():
                conn.send(msg)
        except BaseException as e:
            raise self._fail(e) from e

    def _expect(self, kind: str) -> list:
        """Waits for every other rank's reply `kind`; a rank's error or death raises."""
        from multiprocessing.connection import wait

        self._check()
        replies = {}
        deadline = time.monotonic() + self.timeout_s
        try:
            while len(replies) < len(self.conns):
                waiting = {conn: rank for rank, conn in self.conns.items() if rank not in replies}
                for conn in wait(list(waiting), timeout=0.05):  # returns as soon as one has answered
                    rank = waiting[conn]
                    msg = conn.recv()
                    if msg[0] == "error":
                        raise TensorParallelError(f"tensor-parallel rank {rank} failed: {msg[2]}")
                    if msg[0] != kind:
                        raise TensorParallelError(f"tensor-parallel rank {rank} answered {msg[0]!r}, not {kind!r}")
                    replies[rank] = msg
                for rank, proc in self.procs.items():
                    if rank not in replies and proc.exitcode is not None and not self.conns[rank].poll():
                        raise TensorParallelError(f"tensor-parallel rank {rank} died ({_exit_reason(proc.exitcode)})")
                if time.monotonic() > deadline:
                    late = sorted(set(self.conns) - set(replies))
                    raise TensorParallelError(f"tensor-parallel rank(s) {', '.join(map(str, late))} did not answer "
                                              f"{kind!r} within {self.timeout_s:g} s (hung?)")
        except BaseException as e:
            raise self._fail(e) from e
        return [replies[r] for r in sorted(replies)]

    def take_ops(self) -> list:
        return self.pool.take_ops() if self.pool is not None else []

    def flush(self) -> None:
        """Sends recorded page operations now (memory given back reaches every rank at once)."""
        ops = self.take_ops()
        if ops:
            self.send(("ops", ops))

    def check_integrity(self, kv) -> None:
        """Every other rank checks its pool against rank 0's books (rank 0 checks its own)."""
        self.send(("check", self.take_ops(), books_for_check(kv.books), kv.blocks_per_slot))
        self._expect("checked")

    def rank_pools(self) -> list[dict] | None:
        """Every rank's pool counters, rank 0 first, as each rank's allocator reports them (None
        once a rank has failed)."""
        if self.failed:
            return None
        self.send(("stats", self.take_ops()))
        pools = [self.pool.stats().__dict__] + [msg[2] for msg in self._expect("stats")]
        return [{**p, "rank": r, "device": str(rank_device(self.spec.device, r))} for r, p in enumerate(pools)]

    # ----- collectives and the device ---------------------------------------------------------
    @contextmanager
    def issuing(self):
        """Around everything rank 0 does that issues collectives: raises at once if the engine has
        failed; holds the lock the watcher takes to abort; a failure inside stops the engine."""
        with self.lock:
            self._check()
            try:
                yield
            except BaseException as e:
                raise self._fail(e) from e

    def wait(self, event) -> None:
        """Returns once `event` (recorded on rank 0's device) has completed. Polls rather than
        blocks: under NCCL a kernel waiting for a dead rank never completes, and neither would
        event.synchronize(). Every 10 ms it looks at the other ranks' processes: one that ended (a rank
        that fails reports why, then exits), or a wait past tensor_parallel_timeout (a rank that
        hangs), raises TensorParallelError naming the rank and the cause."""
        self._check()
        start = time.monotonic()
        look_at, nap = start, 20e-6
        while not event.query():
            now = time.monotonic()
            if now >= look_at:
                self._look(now - start)
                look_at = now + 0.01
            time.sleep(nap)
            nap = min(2 * nap, 200e-6)
        self._check()  # an abort completes the kernels too: their results are garbage

    def _look(self, waited: float) -> None:
        self._check()
        for rank, proc in self.procs.items():
            # a rank that fails reports over its pipe and exits; the pipe alone proves nothing (a rank
            # may already answer a request rank 0 has not started waiting for, such as "graphs-ready")
            if proc.exitcode is not None:
                raise self._fail(RuntimeError(f"rank {rank} ended while rank 0 waited for its device"))
        if waited > self.timeout_s:
            alive = ", ".join(map(str, self.alive_ranks()))
            raise self._fail(TensorParallelError(
                f"tensor-parallel rank(s) {alive} stopped answering: rank 0's step did not complete within "
                f"tensor_parallel_timeout={self.timeout_s:g} s (hung?)"))

    def start_graphs(self, max_batch: int) -> None:
        """Every other rank captures decode graphs for the sizes DecodeGraphs picks for max_batch, in
        rank 0's order (each capture's collectives pair with rank 0's)."""
        self.send(("graphs", max_batch))

    def graphs_ready(self, sizes: list[int]) -> None:
        for _, rank, theirs in self._expect("graphs-ready"):
            if theirs != sizes:
                raise self._fail(TensorParallelError(f"tensor-parallel rank {rank} captured decode graphs for sizes "
                                                     f"{theirs}, rank 0 for {sizes}"))

    def replay(self, graph, size: int, slots: list[int], lens: list[int]) -> None:
        """Replays rank 0's decode graph of `size` rows after telling the other ranks to replay
        theirs for the same batch (they pad it as rank 0 did)."""
        with self.issuing():
            self.send(("replay", self.take_ops(), slots, lens, size))
            graph.replay()

    # ----- failure ----------------------------------------------------------------------------
    def _check(self) -> None:
        """Raises the engine's error, if it has one (or finds it, when the watcher saw a rank go)."""
        if self.error is not None:
            raise self.error
        if self.lost:
            raise self._fail(RuntimeError("a rank's process ended"))

    def _watch(self) -> None:
        """A thread: when a rank's process ends (not at close), aborts the communicator. Under NCCL
        rank 0's kernels would wait for it forever, and with them every host thread that waits for
        the device outside wait(): the mapping worker's unmaps, a step that waits for them, the
        KV cache's close. The engine thread's next call into this class raises TensorParallelError."""
        from multiprocessing.connection import wait

        sentinels = [p.sentinel for p in self.procs.values()]
        while not wait(sentinels, timeout=0.5):
            if self.closing or self.error is not None:
                return
        locked = self.lock.acquire(timeout=10.0)  # else the engine thread is stuck on the device: abort anyway
        try:
            if self.closing or self.error is not None:
                return
            self.lost = True
            if self.spec.device.type == "cuda":
                torch.cuda.set_device(self.spec.device)
            self._abort()
        finally:
            if locked:
                self.lock.release()

    def _abort(self) -> None:
        """Once: destroys what holds the communicator's collectives (CUDA graphs), then aborts it."""
        with self._abort_lock:
            if self.aborted:
                return
            self.aborted = True
            for release in self.before_abort:
                release()
            if self.group is not None:
                self.group.abort()

    def _fail(self, cause: BaseException) -> BaseException:
        """Finds out which rank failed and why, stops the other ranks, and returns the error to
        raise (every later call raises it too). KeyboardInterrupt stays itself."""
        if self.error is not None:
            return self.error
        reports, dead = self._collect_reports(wait=isinstance(cause, RuntimeError) or isinstance(cause, OSError))
        if isinstance(cause, TensorParallelError):
            error = cause
        elif dead:
            rank, code = dead[0]
            error = TensorParallelError(f"tensor-parallel rank {rank} died ({_exit_reason(code)})")
        elif reports:
            _, rank, text = reports[0]
            error = TensorParallelError(f"tensor-parallel rank {rank} failed: {text}")
        elif isinstance(cause, (RuntimeError, OSError, EOFError)):
            silent = ", ".join(str(r) for r in self.alive_ranks())
            error = TensorParallelError(f"tensor-parallel rank(s) {silent} stopped answering: a collective on rank 0 "
                                        f"failed and they reported no error (hung past tensor_parallel_timeout="
                                        f"{self.timeout_s:g} s?): {type(cause).__name__}: {cause}")
        else:
            error = TensorParallelError(f"tensor-parallel rank 0 failed: {type(cause).__name__}: {cause}")
        self.error = cause if isinstance(cause, KeyboardInterrupt) else error
        self._stop_ranks(graceful=False)
        self._abort()
        return self.error

    def _collect_reports(self, wait: bool) -> tuple[list, list]:
        """(error reports (time, rank, text) earliest first, ranks dead without a report (rank, exit code))."""
        reports: dict[int, tuple] = {}
        deadline = time.monotonic() + (min(5.0, self.timeout_s) if wait else 0.2)
        while True:
            for rank, conn in self.conns.items():
                try:
                    while rank not in reports and conn.poll():
                        msg = conn.recv()
                        if msg[0] == "error":
                            reports[rank] = (msg[3], rank, msg[2])
                except (EOFError, OSError):
                    pass
            dead = [(r, p.exitcode) for r, p in self.procs.items() if p.exitcode is not None and r not in reports]
            if dead or len(reports) == len(self.conns) or time.monotonic() > deadline:
                break
            if reports:  # the first report is in: give the others a moment
                deadline = min(deadline, time.monotonic() + 0.5)
            time.sleep(0.02)
        return sorted(reports.values()), dead

    def _stop_ranks(self, graceful: bool) -> None:
        for conn in self.conns.values():
            if graceful:
                try:
                    conn.send(("close",))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 10.0
        for proc in self.procs.values():
            if graceful:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=2.0)
            if proc.is_alive():  # a failed rank's state is worthless; a stopped (or hung) one ignores SIGTERM
                proc.kill()
                proc.join(timeout=5.0)
        for conn in self.conns.values():
            conn.close()

    def close(self, error: BaseException | None = None) -> None:
        """Stops every other rank (no process is left behind) and leaves the process group.
        error: why the engine gives up (its start failed): the ranks are stopped, not asked."""
        if self.closed:
            return
        if error is not None and self.error is None:
            self._fail(error)
        with self.lock:  # the watcher ignores ranks that exit from now on
            self.closing = True
        self._stop_ranks(graceful=self.error is None)
        for release in self.before_abort:  # graphs before the communicator (NCCL waits for them)
            release()
        if self.group is not None:
            self.group.close()
        if self._watcher is not None:
            self._watcher.join(timeout=2.0)
        self.closed = True
        shutil.rmtree(self.store_dir, ignore_errors=True)

    @property
    def failed(self) -> bool:
        """A rank failed or its process ended: every later call raises TensorParallelError."""
        return self.error is not None or self.lost

    def alive_ranks(self) -> list[int]:
        return [r for r, p in self.procs.items() if p.is_alive()]


class RankModel:
    """Rank 0's face of the sharded model: the runner calls forward() and logits() as on a whole
    LlamaModel; each call first tells the other ranks to run their shard of it."""

    def __init__(self, shard, tp: TensorParallel):
        self.shard, self.tp = shard, tp
        self.cfg, self.device, self.dtype = shard.cfg, shard.device, shard.dtype

    def forward(self, input_ids, positions, kv_cache, attn, meta) -> torch.Tensor:
        tp = self.tp
        with tp.issuing():
            tp.send(("step", tp.take_ops(), meta.slot_ids_host, meta.query_lens_host, meta.context_lens_host,
                     input_ids.numel()))
            return self.shard.forward(input_ids, positions, kv_cache, attn, meta)  # broadcasts the ids first

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        with tp.issuing():
            tp.send(("logits", hidden.shape[0]))
            tp.group.broadcast(hidden.contiguous())  # the rows to sample are rank 0's choice: send them
            return self.shard.logits(hidden)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ----- ranks 1..N-1 --------------------------------------------------------------------------
class RankWorker:
    def __init__(self, rank: int, spec: RankSpec, group: TPGroup, model, conn):
        from glakeserve.model_runner import HostStaging

        self.rank, self.spec, self.group, self.model, self.conn = rank, spec, group, model, conn
        self.device = rank_device(spec.device, rank)
        self.kv = self.attn = self.replayer = self.graphs = None
        self.last_event = None  # after this rank's last launched step (GPU)
        # inputs go to the device as rank 0's do: through pinned buffers, no host sync; a set is
        # reused once the step that used it last (two steps back) has completed
        self.staging = [HostStaging(self.device), HostStaging(self.device)]
        self.staged: list = [None, None]  # the event of the step that used each set
        self._turn = 0

    def build_kv(self, args: dict) -> None:
        from glakeserve.attention import make_backend
        from glakeserve.kv import make_kv_cache

        self.kv = make_kv_cache(args.pop("layout"), args.pop("cfg"), args.pop("dtype"), self.device, **args)
        self.attn = make_backend(self.spec.attention_backend, self.device, self.kv.cfg.num_kv_heads)
        self.replayer = Replayer(self.kv.pool, self.kv.vtensors)
        if self.device.type == "cuda":  # as rank 0's runner: compile now
            self.attn.warm_up(self.kv.k_cache(0), self.kv.v_cache(0), self.model.cfg.num_heads, self.kv.padding_slot(),
                              self.kv.block_table)

    def _take_staging(self):
        turn, self._turn = self._turn, self._turn ^ 1
        if self.staged[turn] is not None:
            self.staged[turn].synchronize()  # long done, as a rule (rank 0 has read that step)
        staging = self.staging[turn]
        staging.reset()
        return staging, turn

    def _launched(self, turn: int) -> None:
        if self.device.type == "cuda":
            self.last_event = torch.cuda.Event()
            self.last_event.record()
            self.staged[turn] = self.last_event

    @torch.inference_mode()
    def step(self, ops, slots, qlens, ctxs, num_tokens: int) -> None:
        self.replayer.apply(ops, after=self.last_event)
        self.replayer.wait()
        staging, turn = self._take_staging()
        meta = self.attn.prepare_metadata(slots, qlens, ctxs, self.device, block_table=None, to_device=staging.put)
        ids = torch.empty(num_tokens, dtype=torch.int64, device=self.device)  # the model broadcasts rank 0's into it
        self.model.forward(ids, meta.positions, self.kv, self.attn, meta)
        self._launched(turn)

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int) -> list[int]:
        """Decode graphs for the sizes rank 0 captures, in its order (see DecodeGraphs)."""
        from glakeserve.model_runner import DecodeGraphs

        self.replayer.wait_all()  # no mapping job runs during a capture
        last_token = torch.zeros(self.kv.num_slots, dtype=torch.int64, device=self.device)  # unread: rank 0 sends ids
        self.graphs = DecodeGraphs(self.model, self.kv, self.attn, max_batch, last_token)
        self.graphs.capture()
        return self.graphs.sizes

    @torch.inference_mode()
    def replay(self, ops, slots, lens, size: int) -> None:
        """Rank 0 replays its graph of `size` rows for this decode batch: the same here."""
        self.replayer.apply(ops, after=self.last_event)
        self.replayer.wait()
        if self.graphs.size_for(len(slots)) != size:
            raise RuntimeError(f"rank 0 replays its decode graph of {size} rows for {len(slots)} sequences, this rank "
                               f"would pick {self.graphs.size_for(len(slots))}")
        staging, turn = self._take_staging()
        self.graphs.run(staging, [0] * len(slots), slots, lens)  # placeholder ids: the graph broadcasts rank 0's
        self._launched(turn)

    @torch.inference_mode()
    def logits(self, rows: int) -> None:
        hidden = self.group.broadcast(torch.empty(rows, self.model.cfg.hidden_size, dtype=self.model.dtype,
                                                  device=self.device))
        self.model.logits(hidden)

    def serve(self) -> None:
        conn = self.conn
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # rank 0 is gone
                return
            kind = msg[0]
            if kind == "step":
                self.step(*msg[1:])
            elif kind == "replay":
                self.replay(*msg[1:])
            elif kind == "logits":
                self.logits(msg[1])
            elif kind == "ops":
                self.replayer.apply(msg[1], after=self.last_event)
            elif kind == "check":
                self.replayer.apply(msg[1], after=self.last_event)
                self.replayer.check(msg[2], msg[3])
                conn.send(("checked", self.rank))
            elif kind == "stats":
                self.replayer.apply(msg[1], after=self.last_event)
                self.replayer.wait_all()
                conn.send(("stats", self.rank, self.kv.pool.stats().__dict__))
            elif kind == "kv":
                self.build_kv(msg[1])
                conn.send(("kv-ready", self.rank))
            elif kind == "graphs":
                conn.send(("graphs-ready", self.rank, self.capture_graphs(msg[1])))
            elif kind == "close":
                return
            else:
                raise ValueError(f"unknown message {kind!r}")

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.release()
        if self.attn is not None:
            self.attn.close()
        if self.replayer is not None:
            self.replayer.wait_all()
        if self.kv is not None:
            self.kv.close()


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this rank when rank 0's process is gone, even while it computes or waits."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="glake-tp-parent-watch", daemon=True).start()


def worker_main(rank: int, spec: RankSpec, conn, parent_pid: int) -> None:
    """A spawned rank: joins the group, loads its shard, then serves rank 0's messages until told
    to close or rank 0 goes away. An error is reported to rank 0 over the pipe, then the rank exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's (the chat cancels a reply with it)
    _exit_with_parent(parent_pid)
    worker = None
    try:
        from glakeserve.model.loader import load_model

        device = rank_device(spec.device, rank)
        if device.type == "cuda":
            nccl_environment()
            torch.cuda.set_device(device)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.size))
        conn.send(("hello", rank))
        group = TPGroup(TPShard.plan(spec.model_config, spec.size, rank), spec.store_file, device, spec.timeout_s)
        model = load_model(spec.source, spec.dtype, device, spec.max_model_len, spec.seed, tp=group)
        worker = RankWorker(rank, spec, group, model, conn)
        conn.send(("ready", rank))
        worker.serve()
        worker.close()
        if device.type == "cuda":
            # no destroy of the NCCL communicator: it flushes and may wait for rank 0, which waits for
            # this process to end; its memory goes with the process, and rank 0 aborts its side
            os._exit(0)
        group.close()
    except BaseException as e:
        try:
            conn.send(("error", rank, f"{type(e).__name__}: {e}", time.time(), traceback.format_exc()))
            conn.close()
        finally:
            os._exit(1)
