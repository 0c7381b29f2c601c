"""The elastic KV pool as `glake serve` runs it (AsyncEngine, idle release timer): under load the
pool grows from its start size toward its limit; mid-load the limit is lowered then raised again (a
shrink/grow cycle); when the load stops, free pages go back to the device after the idle time.
Device memory is read with torch.cuda.mem_get_info (cuMemGetInfo) before and after; every request
must finish.

    python benchmarks/elastic_pool.py [--model llama-3-8b] [--requests 128] [--idle 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch

from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from glakeserve.server.async_engine import AsyncEngine
from report import save_json

GIB = float(1 << 30)


async def run(args) -> dict:
    llm = LLM(args.model, load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=args.requests,
              kv_cache_memory=args.start_gib * (1 << 30), kv_cache_max_memory=args.max_gib * (1 << 30))
    engine = llm.engine
    ae = AsyncEngine(engine, idle_release_s=args.idle)
    first = engine.stats()
    page = first["pool"]["page_size"]
    out = {"start_pages": first["kv_pages"]["total"], "free_gib_at_start": torch.cuda.mem_get_info()[0] / GIB}
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size

    async def one(i):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(args.max_model_len // 8, args.max_model_len // 2))]
        last = None
        async for o in ae.generate(ids, SamplingParams(temperature=1.0, max_tokens=rng.randint(args.max_model_len // 32, args.max_model_len // 8),
                                                       ignore_eos=True), stream=False):
            last = o
        return last

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one(i)) for i in range(args.requests)]
    await asyncio.sleep(args.cycle_after)
    peak = await asyncio.to_thread(ae.call, lambda e: e.stats()["kv_pages"]["total"])
    low = await asyncio.to_thread(ae.call, lambda e: e.set_kv_limit(int(args.low_gib * (1 << 30))))
    await asyncio.sleep(args.cycle_after)
    high = await asyncio.to_thread(ae.call, lambda e: e.set_kv_limit(int(args.max_gib * (1 << 30))))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    t_stop = time.monotonic()
    failed = [r for r in results if isinstance(r, BaseException) or r is None or r.finish_reason != "length"]
    busy = await asyncio.to_thread(ae.call, lambda e: (e.stats()["kv_pages"]["total"], torch.cuda.mem_get_info()[0]))
    while ae.released_pages == 0 and time.monotonic() - t_stop < args.idle + 30:
        await asyncio.sleep(0.05)
    t_released = time.monotonic()
    after = await asyncio.to_thread(ae.call, lambda e: (e.stats()["kv_pages"]["total"], torch.cuda.mem_get_info()[0]))
    ae.shutdown()
    llm.close()
    out.update({
        "requests": args.requests, "failed": len(failed), "load_seconds": t_stop - t0,
        "pool_pages_before_cycle": peak, "after_lowering": low, "after_raising": high,
        "pool_gib_when_load_stopped": busy[0] * page / GIB, "free_gib_when_load_stopped": busy[1] / GIB,
        "released_after_s": t_released - t_stop, "idle_setting_s": args.idle,
        "pool_gib_after_release": after[0] * page / GIB, "free_gib_after_release": after[1] / GIB,
        "returned_gib": (after[1] - busy[1]) / GIB,
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--start-gib", type=float, default=8)
    ap.add_argument("--max-gib", type=float, default=40)
    ap.add_argument("--low-gib", type=float, default=12)
    ap.add_argument("--idle", type=float, default=2.0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--cycle-after", type=float, default=3.0, help="seconds into the load to lower, then raise, the limit")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = asyncio.run(run(args))
    print(json.dumps(out, indent=2))
    save_json(out, args.json)


if __name__ == "__main__":
    main()
