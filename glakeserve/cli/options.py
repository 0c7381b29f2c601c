"""Engine options shared by chat, bench, serve and inspect-memory."""

from __future__ import annotations

import re
from typing import Annotated, Optional

import typer

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A name (default: the embedded SmolLM2-135M-Instruct), a HF model directory, a repo id "
                          "in the offline HF cache, a .gguf file, or with --load-format dummy a shape "
                          "(llama-7b, llama-2-7b, llama-3-8b, llama-13b, smollm2-135m, ...).")]
Dtype = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="Context length (default: the model's, at most 8192).")]
MaxNumSeqs = Annotated[Optional[int], typer.Option(help="Requests running at once (default 16 on CPU, 256 on GPU).")]
MaxBatchedTokens = Annotated[Optional[int], typer.Option(help="Token budget of one step (chunked prefill).")]
KVMemory = Annotated[Optional[str], typer.Option(
    help="KV cache size: bytes (e.g. 2GiB, 512MiB) or a fraction of free memory (e.g. 0.5).")]
KVMaxMemory = Annotated[Optional[str], typer.Option(
    help="How far the KV pool may grow when short (it starts at --kv-cache-memory): bytes or a fraction.")]
LoadFormat = Annotated[str, typer.Option(
    help="auto (dense weights), gguf (run a GGUF's own 4-bit/8-bit tensors; CPU only), or dummy for random "
         "weights of a named shape.")]
KVLayout = Annotated[str, typer.Option(
    help="token-major (one virtual range per request holds every layer's K and V: at most one partly used page a "
         "request), page-major (the same, a page's tokens stored layer by layer), per-layer (a vTensor per layer "
         "and K/V: a view per layer is contiguous), or paged (the block-table baseline, for comparison); "
         "benchmarks/RESULTS.md compares them.")]
Seed = Annotated[int, typer.Option(help="Seed for requests that bring none.")]
TensorParallelSize = Annotated[int, typer.Option(
    "--tensor-parallel-size", "-tp", min=1,
    help="Split the model over this many devices (one process each; gloo on CPUs, NCCL on GPUs). "
         "--kv-cache-memory is then per device.")]
AttentionBackend = Annotated[str, typer.Option(
    help="auto (cudnn on a GPU with nvidia-cudnn-frontend installed, else triton; torch on the CPU), triton, cudnn "
         "(the Triton kernels, with cuDNN's fused attention for prefills of 1,024+ new tokens), torch (the "
         "reference), or flash-attn.")]
NoPrefixCaching = Annotated[bool, typer.Option("--no-prefix-caching", help="Turn prefix caching off.")]
EnforceEager = Annotated[bool, typer.Option(
    "--enforce-eager", help="No CUDA graphs (neither decode graphs nor piecewise graphs of prefill and mixed steps): "
                            "faster start-up, slower steps. GPU only; the CPU never uses graphs.")]

UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
         "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def parse_memory(text: str | None, option: str = "--kv-cache-memory") -> float | None:
    """'2GiB' -> bytes; '0.5' -> a fraction of free memory; None -> the default. A bad value is
    blamed on `option`, the flag it came from."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise typer.BadParameter(f"{text!r}: give bytes like 2GiB or 512MiB, or a fraction like 0.5",
                                 param_hint=option)
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if value <= 0:
        raise typer.BadParameter("must be positive", param_hint=option)
    return value


def engine_kwargs(model, dtype, device, max_model_len, max_num_seqs, max_num_batched_tokens, kv_cache_memory,
                  load_format, kv_layout, seed) -> dict:
    return dict(model=model, dtype=dtype, device=device, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=parse_memory(kv_cache_memory),
                load_format=load_format, kv_layout=kv_layout, seed=seed)
