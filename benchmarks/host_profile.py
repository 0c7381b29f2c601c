"""Where the engine thread's time goes, function by function: cProfile over a window of engine
steps of the real (overlapped) engine on ShareGPT, llama-3-8b random bf16 weights, every request
queued at t=0 as in engine_gpu.py. Prints the engine's phase seconds and step paths for the window
and the profile's top functions by own time.

    python benchmarks/host_profile.py --num-prompts 400 --warmup-steps 20 --steps 200 [--graph-tokens 0]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

from glakeserve.datasets import sample_sharegpt
from glakeserve.llm import LLM
from glakeserve.model.loader import _default_tokenizer_dir
from glakeserve.sampling import SamplingParams
from glakeserve.tokenizer import Tokenizer
from report import close_llm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--graph-tokens", type=int, default=None, help="the engine's cuda_graph_max_tokens")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=2048,
              cuda_graph_max_tokens=args.graph_tokens)
    eng = llm.engine
    for r in sample_sharegpt(Tokenizer(_default_tokenizer_dir()), args.num_prompts, seed=0):
        eng.add_request(r.prompt_token_ids, SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True),
                        stream=False)  # as `glake bench` and engine_gpu.py: no incremental detokenization
    for _ in range(args.warmup_steps):
        eng.step()
    before = dict(eng.clock.seconds)
    paths: dict[str, list] = {}
    stats: dict[str, pstats.Stats] = {}  # one profile a step, merged by the path the step took
    t0 = time.perf_counter()
    for _ in range(args.steps):
        if not eng.has_unfinished_requests():
            break
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        eng.step()
        prof.disable()
        agg = paths.setdefault(eng.last_path, [0, 0.0])
        agg[0] += 1
        agg[1] += time.perf_counter() - t
        if eng.last_path in stats:
            stats[eng.last_path].add(prof)
        else:
            stats[eng.last_path] = pstats.Stats(prof)
    wall = time.perf_counter() - t0
    phases = {k: round(v - before.get(k, 0.0), 3) for k, v in eng.clock.seconds.items()}
    print(f"window: {wall:.2f} s under cProfile; steps by path (count, s): {paths}\nphases (s): {phases}")
    for path, st in stats.items():
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            st.stream = text
            st.sort_stats(order).print_stats(args.top)
            print(f"----- steps that took the {path} path, by {order}\n" + text.getvalue().split("\n\n", 1)[-1])
    close_llm(llm)


if __name__ == "__main__":
    main()
