"""Attention backends behind one interface (base.py): the torch reference (any device), Triton
kernels (GPU; also runs in Triton's interpreter on the CPU), Triton with cuDNN's fused attention for
long prefills (GPU, with nvidia-cudnn-frontend), and flash-attn where it is importable."""

from __future__ import annotations

import importlib.util

import torch

from glakeserve.attention import cudnn_prefill
from glakeserve.attention.base import AttentionBackend, AttentionMetadata  # noqa: F401

BACKENDS = ("auto", "torch", "triton", "cudnn", "flash-attn")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def make_backend(name: str, device: torch.device, kv_heads: int) -> AttentionBackend:
    """auto: on a GPU, cudnn where nvidia-cudnn-frontend is installed, else triton; the torch
    reference on the CPU."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "auto":
        name = "torch" if device.type != "cuda" else "cudnn" if cudnn_prefill.available() else "triton"
    if name == "cudnn" and device.type != "cuda":
        raise ValueError("the cudnn attention backend needs a CUDA GPU; on the CPU use --attention-backend torch")
    if name == "torch":
        from glakeserve.attention.torch_ref import TorchReferenceBackend

        return TorchReferenceBackend()
    if name in ("triton", "cudnn"):
        from glakeserve.attention.triton_backend import TritonBackend

        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        prefill = cudnn_prefill.CudnnPrefill(device) if name == "cudnn" else None
        return TritonBackend(kv_heads, sms, prefill)
    if not flash_attn_available():
        raise ValueError("the flash-attn backend needs the flash_attn package, which is not installed here")
    from glakeserve.attention.flash_attn_backend import FlashAttnBackend

    return FlashAttnBackend()
