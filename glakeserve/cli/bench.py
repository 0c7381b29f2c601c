"""`glake bench`: offline throughput, comparable with vLLM's benchmark_throughput.

Every request is queued at t=0 (temperature 1, EOS ignored, max_tokens = the sampled output length,
as vLLM does), the engine runs until all are done, and the figures are printed in vLLM's words plus
a table of latencies and memory. `--backend hf` runs HF transformers `generate` on the same requests
as the in-run baseline (left-padded batches, each batch generating its longest output).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from glakeserve.datasets import BenchRequest
from glakeserve.sampling import SamplingParams

TIMELINE_INTERVAL = 0.25  # seconds between the timeline's samples of the engine's stats


@dataclass
class BenchResult:
    backend: str
    elapsed: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    peak_batch: int = 0
    pages_mapped: int = 0
    preemptions: int = 0
    mapping_waits: int = 0
    engine_driver_calls: int = 0  # driver calls the engine's thread waited on (0 in steady state)
    timeline: list[dict] = field(default_factory=list)
    step_paths: dict = field(default_factory=dict)  # "graph" / "eager" -> [steps, seconds]

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("ttft", "tpot", "timeline")}
        out.update(requests_per_s=self.requests_per_s, total_tokens_per_s=self.total_tokens_per_s,
                   output_tokens_per_s=self.output_tokens_per_s)
        for name, values in (("ttft", self.ttft), ("tpot", self.tpot)):
            for p in (50, 90, 99):
                out[f"{name}_p{p}_ms"] = float(np.percentile(values, p) * 1e3) if values else None
        return out


def run_glake(llm, reqs: list[BenchRequest], console: Console) -> BenchResult:
    engine = llm.engine
    t0 = time.monotonic()
    for r in reqs:
        engine.add_request(r.prompt_token_ids,
                           SamplingParams(temperature=1.0, top_p=1.0, max_tokens=r.output_len, ignore_eos=True),
                           arrival_time=t0, stream=False)
    res = BenchResult("glake", 0.0, len(reqs), sum(r.prompt_len for r in reqs), 0)
    first = engine.stats(ranks=False)  # t = 0: every request queued, nothing run yet (the plot's axes start here)
    mapped_before, page = first["pool"]["pages_mapped"], first["pool"]["page_size"]
    bytes_per_token, reserved_per_slot = first["kv_bytes_per_token"], first["kv_reserved_pages_per_slot"]
    res.timeline.append({"t": 0.0, "generated": 0, "running": 0, "waiting": len(reqs),
                         "mapped_bytes": (first["kv_pages"]["total"] - first["kv_pages"]["free"]) * page,
                         "reserved_bytes": 0, "token_bytes": 0})
    with _progress(console) as progress:
        task = progress.add_task("requests", total=len(reqs))
        while engine.has_unfinished_requests():
            t_step = time.monotonic()
            outs = engine.step()
            dt = time.monotonic() - t_step
            agg = res.step_paths.setdefault(engine.last_path, [0, 0.0])
            agg[0] += 1
            agg[1] += dt
            for out in outs:
                if out.finished:
                    progress.advance(task)
                    res.output_tokens += out.num_output_tokens
                    if out.metrics.ttft is not None:
                        res.ttft.append(out.metrics.ttft)
                    tpot = out.metrics.tpot(out.num_output_tokens)
                    if tpot is not None:
                        res.tpot.append(tpot)
            # every step at first (short runs), then every TIMELINE_INTERVAL s (stats() is not free)
            if len(res.timeline) < 32 or time.monotonic() - t0 - res.timeline[-1]["t"] >= TIMELINE_INTERVAL:
                res.timeline.append(_sample(engine.stats(ranks=False), t0, page, reserved_per_slot, bytes_per_token))
    res.timeline.append(_sample(engine.stats(ranks=False), t0, page, reserved_per_slot, bytes_per_token))  # the end
    res.elapsed = time.monotonic() - t0
    stats = engine.stats()
    res.pages_mapped = stats["pool"]["pages_mapped"] - mapped_before
    res.preemptions = stats["preemptions"]
    res.mapping_waits = stats["mapping_waits"]
    res.engine_driver_calls = stats["engine_driver_calls"]
    res.peak_batch = max(res.peak_batch, max((p["running"] for p in res.timeline), default=0))
    return res


def _sample(s: dict, t0: float, page: int, reserved_per_slot: int, bytes_per_token: int) -> dict:
    """One point of the timeline from engine.stats()."""
    kv = s["kv_pages"]
    return {"t": time.monotonic() - t0, "generated": s["generation_tokens"], "running": s["running"],
            "waiting": s["waiting"], "mapped_bytes": (kv["total"] - kv["free"]) * page,
            "reserved_bytes": s["running"] * reserved_per_slot * page, "token_bytes": s["running_tokens"] * bytes_per_token}


def run_hf(model, reqs: list[BenchRequest], batch_size: int, pad_id: int, console: Console) -> BenchResult:
    import torch

    device = next(model.parameters()).device
    res = BenchResult("hf", 0.0, len(reqs), sum(r.prompt_len for r in reqs), sum(r.output_len for r in reqs))
    t0 = time.monotonic()
    with _progress(console) as progress, torch.no_grad():
        task = progress.add_task("requests (hf)", total=len(reqs))
        for i in range(0, len(reqs), batch_size):
            chunk = reqs[i:i + batch_size]
            longest = max(r.prompt_len for r in chunk)
            ids = torch.tensor([[pad_id] * (longest - r.prompt_len) + r.prompt_token_ids for r in chunk], device=device)
            mask = torch.tensor([[0] * (longest - r.prompt_len) + [1] * r.prompt_len for r in chunk], device=device)
            new = max(r.output_len for r in chunk)
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad_id)
            progress.advance(task, len(chunk))
            res.peak_batch = max(res.peak_batch, len(chunk))
    res.elapsed = time.monotonic() - t0
    return res


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def report(res: BenchResult, console: Console) -> None:
    # vLLM's lines, so scripts that parse them keep working
    console.print(f"Throughput: {res.requests_per_s:.2f} requests/s, {res.total_tokens_per_s:.2f} total tokens/s, "
                  f"{res.output_tokens_per_s:.2f} output tokens/s", highlight=False)
    console.print(f"Total num prompt tokens:  {res.prompt_tokens}", highlight=False)
    console.print(f"Total num output tokens:  {res.output_tokens}", highlight=False)
    s = res.summary()
    t = Table(title=f"glake bench ({res.backend})", title_justify="left")
    t.add_column("metric")
    t.add_column("p50", justify="right")
    t.add_column("p90", justify="right")
    t.add_column("p99", justify="right")
    for name in ("ttft", "tpot"):
        vals = [s[f"{name}_p{p}_ms"] for p in (50, 90, 99)]
        t.add_row(f"{name.upper()} (ms)", *("-" if v is None else f"{v:.1f}" for v in vals))
    console.print(t)
    t2 = Table(show_header=False, box=None)
    t2.add_row("elapsed", f"{res.elapsed:.2f} s")
    t2.add_row("peak batch size", str(res.peak_batch))
    if res.backend == "glake":
        t2.add_row("KV pages mapped", str(res.pages_mapped))
        t2.add_row("preemptions", str(res.preemptions))
        t2.add_row("mapping waits", str(res.mapping_waits))
        t2.add_row("engine-thread driver calls", str(res.engine_driver_calls))
    console.print(t2)


def check_output_path(path: Path, option: str, formats: set[str] | None = None) -> None:
    """Raises ValueError, naming the option, when `path` cannot be written (checked before a run)."""
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable here; choose another path")
    if formats is not None and path.suffix and path.suffix[1:].lower() not in formats:
        raise ValueError(f"{option} {path}: matplotlib cannot write {path.suffix} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")


def plot_formats() -> set[str]:
    """The file types the plot can be saved as."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def length_summary(lengths: list[int]) -> dict:
    return {"mean": float(np.mean(lengths)), "min": int(min(lengths)), "max": int(max(lengths)),
            "total": int(sum(lengths))}


def write_json(path: str, res: BenchResult, config: dict) -> None:
    with open(path, "w") as f:
        json.dump({"config": config, "results": res.summary(), "timeline": res.timeline}, f, indent=2)


def plot(path: str, res: BenchResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = res.timeline
    if len(tl) < 2:
        raise ValueError("too few steps to plot")
    t = np.array([p["t"] for p in tl])
    gen = np.array([p["generated"] for p in tl], dtype=float)
    window = max(1, len(t) // 50)
    rate = np.zeros_like(t)
    rate[window:] = (gen[window:] - gen[:-window]) / np.maximum(t[window:] - t[:-window], 1e-9)
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    axes[0].plot(t, rate)
    axes[0].set_ylabel("output tokens/s")
    axes[1].plot(t, [p["running"] for p in tl], label="running", drawstyle="steps-post")
    axes[1].plot(t, [p["waiting"] for p in tl], label="waiting", drawstyle="steps-post")
    axes[1].set_ylabel("requests")
    axes[1].legend()
    gib = float(1 << 30)
    # what the pages cost next to what the tokens need; the reserved address space is orders of
    # magnitude larger, so it gets its own panel rather than flattening these two lines. Each point
    # is the state after a step, held until the next one (steps, not slopes)
    axes[2].plot(t, [p["mapped_bytes"] / gib for p in tl], label="mapped (physical pages)", drawstyle="steps-post")
    axes[2].plot(t, [p["token_bytes"] / gib for p in tl], label="KV the tokens need", drawstyle="steps-post")
    axes[2].set_ylabel("KV memory (GiB)")
    axes[2].legend()
    axes[3].plot(t, [p["reserved_bytes"] / gib for p in tl], color="tab:gray", drawstyle="steps-post")
    axes[3].set_ylabel("reserved virtual\n(running slots, GiB)")
    axes[3].set_xlabel("seconds since the requests were queued")
    axes[3].set_xlim(0, t[-1])
    fig.suptitle(f"glake bench: {res.num_requests} requests, {res.total_tokens_per_s:.0f} total tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
