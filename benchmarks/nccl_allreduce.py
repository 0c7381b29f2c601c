"""NCCL all-reduce between this machine's GPUs at the sizes a tensor-parallel step reduces: the
hidden state of T tokens ([T, hidden] in bf16), from T = 1 (batch-1 decode) to 8,192 (a full prefill
chunk). For each size: the time of one all-reduce issued eagerly (one launch each, back to back)
and replayed from a CUDA graph (as the decode graphs issue them); algorithm bandwidth (bytes /
time) and bus bandwidth (x 2(n-1)/n, NCCL's measure, comparable across rank counts); and what a
step's all-reduces cost: 2 a layer + 1 (the embedding lookup) of the model given.

    python benchmarks/nccl_allreduce.py --model llama-3-8b --ranks 2 --json out.json

One process per GPU, as the engine runs them (NCCL_NVLS_ENABLE=0 in each). Also a smoke test of
what the engine's decode graphs need: NCCL collectives captured by torch on every rank in step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback

import torch

TOKENS = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 8192]


def timed(fn, reps: int) -> float:
    """Milliseconds per call of fn, by CUDA events around `reps` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def rank_main(rank: int, ranks: int, hidden: int, store: str, queue) -> None:
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=ranks, device_id=dev)
        rows = []
        for t in TOKENS:
            x = torch.zeros(t, hidden, dtype=torch.bfloat16, device=dev)  # zeros: sums stay finite
            for _ in range(5):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            dist.barrier()
            eager_ms = timed(lambda: dist.all_reduce(x), 50)
            per_graph = 20
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(per_graph):
                    dist.all_reduce(x)
            graph.replay()
            torch.cuda.synchronize()
            dist.barrier()
            graph_ms = timed(graph.replay, 10) / per_graph
            graph.reset()
            rows.append({"tokens": t, "bytes": x.numel() * x.element_size(), "eager_us": eager_ms * 1e3,
                         "graph_us": graph_ms * 1e3})
        torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            queue.put({"rows": rows})
    except BaseException as e:  # noqa: BLE001 - reported, then this rank ends
        queue.put({"error": f"rank {rank}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    finally:
        queue.close()
        queue.join_thread()  # what was put reaches the parent before the exit below
        os._exit(0)  # no communicator teardown: a destroy may wait for the other rank; the process takes it all


def main() -> None:
    import torch.multiprocessing as mp

    from glakeserve.model.config import DUMMY_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(DUMMY_SHAPES))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = DUMMY_SHAPES[args.model]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    result = {"model": args.model, "hidden": cfg.hidden_size, "layers": cfg.num_layers, "ranks": args.ranks,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        v = torch.cuda.nccl.version()
        result.update(device=torch.cuda.get_device_name(0), nccl=".".join(map(str, v)) if isinstance(v, tuple) else str(v))
    except Exception as e:  # noqa: BLE001 - no GPU or no NCCL here: said in the JSON
        result["error"] = f"{type(e).__name__}: {e}"
        finish(result, args.json)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="glake-nccl-"), "store")
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, cfg.hidden_size, store, queue)) for r in range(args.ranks)]
    for proc in procs:
        proc.start()
    try:
        got = queue.get(timeout=args.timeout)
    except Exception as e:  # noqa: BLE001
        got = {"error": f"no answer within {args.timeout:g} s ({type(e).__name__})"}
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    result.update(got)
    per_step = 2 * cfg.num_layers + 1
    factor = 2 * (args.ranks - 1) / args.ranks
    for row in result.get("rows", []):
        best = min(row["eager_us"], row["graph_us"]) * 1e-6
        row["algbw_GBps"] = row["bytes"] / best / 1e9
        row["busbw_GBps"] = row["algbw_GBps"] * factor
        row["step_allreduces"] = per_step
        row["step_allreduce_ms_graph"] = per_step * row["graph_us"] / 1e3
    if "rows" in result:
        print(f"NCCL {result['nccl']}, {args.ranks} x {result['device']}, [T, {cfg.hidden_size}] bf16; a step of "
              f"{args.model}: {per_step} all-reduces")
        print(f"{'T':>6} {'MiB':>8} {'eager us':>9} {'graph us':>9} {'busbw GB/s':>11} {'step ms (graph)':>16}")
        for r in result["rows"]:
            print(f"{r['tokens']:>6} {r['bytes'] / 2**20:>8.3f} {r['eager_us']:>9.1f} {r['graph_us']:>9.1f} "
                  f"{r['busbw_GBps']:>11.1f} {r['step_allreduce_ms_graph']:>16.3f}")
    else:
        print(f"failed: {result.get('error')}\n{result.get('traceback', '')}")
    finish(result, args.json)


def finish(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    raise SystemExit(0 if "rows" in result else 1)


if __name__ == "__main__":
    main()
