"""Attention backends behind one interface (base.py)."""

from __future__ import annotations

import torch

from glakeserve.attention.base import AttentionBackend, AttentionMetadata  # noqa: F401

BACKENDS = ("auto", "torch")


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    from glakeserve.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend()
