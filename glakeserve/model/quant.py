"""Quantized linear layers for the CPU, as a GGUF file stores its weights (`load_format="gguf"`).

  Int4Linear  llama.cpp's Q4_1: 4-bit codes in groups of 32 along the input, each group with a
              scale and a minimum, w = scale * q + min. Runs through torch's CPU int4 kernel.
  Int8Linear  8-bit codes with one scale per output row, w = scale * q (for Q8_0 tensors, whose
              per-32 scales become one per row). Runs through torch's CPU int8 weight-only kernel.

Both kernels take bfloat16 activations and scales: a layer rounds its input to bfloat16 and its
output back to the model's dtype, so everything around the matmuls (norms, RoPE, attention, the KV
cache) keeps the model's dtype. The codes are recovered from the dense weights the GGUF was
converted to: a Q4_1 block's minimum is its code 0 and its maximum its code 15, so re-quantizing
the dequantized block gives back the file's codes exactly (`from_dense` checks it).

Batch-1 decode on the 2-core CPU streams about 8x fewer bytes than float32 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

GROUP = 32  # Q4_1's block


class Int4Linear:
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int = GROUP):
        """codes [out, in] integers in [0, 15]; scales, mins [out, in / group]."""
        out_features, in_features = codes.shape
        if in_features % group or scales.shape != (out_features, in_features // group) or mins.shape != scales.shape:
            raise ValueError(f"Int4Linear: codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, mins "
                             f"{tuple(mins.shape)} do not fit groups of {group}")
        self.group = group
        self.shape = (out_features, in_features)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # the kernel computes scale * (q - 8) + zero: zero is the value of code 8
        zeros = mins + 8 * scales
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()  # [groups, out, 2]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, group: int = GROUP, check: bool = True) -> Int4Linear:
        return cls(*cls.quantize(weight, group, check), group)

    @staticmethod
    def quantize(weight: torch.Tensor, group: int = GROUP, check: bool = True):
        """(codes as uint8, scales, minimums) of a weight whose every group of `group` inputs holds at
        most 16 evenly spaced values from its minimum to its maximum (a dequantized Q4_1 tensor).
        check: raise ValueError when the weight is not of that form (re-quantizing would change it)."""
        out_features, in_features = weight.shape
        w = weight.float().reshape(out_features, in_features // group, group)  # [out, groups, group]
        lo, hi = w.amin(-1), w.amax(-1)
        scales = (hi - lo) / 15
        step = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round((w - lo[..., None]) / step[..., None]).clamp(0, 15)
        if check:
            err = (codes * scales[..., None] + lo[..., None] - w).abs().amax()
            if err > 1e-4 * float(w.abs().amax()):
                raise ValueError(f"a weight {tuple(weight.shape)} is not 4-bit groups of {group} (re-quantizing "
                                 f"moves it by up to {float(err):.3g}); load it with load_format auto")
        return codes.reshape(out_features, in_features).to(torch.uint8), scales, lo

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.scales_zeros)
        return y.to(x.dtype)


class Int8Linear:
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        """codes [out, in] int8; scales [out]."""
        if codes.dtype != torch.int8 or scales.shape != codes.shape[:1]:
            raise ValueError(f"Int8Linear: codes {tuple(codes.shape)} {codes.dtype}, scales {tuple(scales.shape)}")
        self.shape = tuple(codes.shape)
        self.codes = codes.contiguous()
        self.scales = scales.to(torch.bfloat16)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> Int8Linear:
        """Symmetric, one scale per output row (the row's largest magnitude maps to 127)."""
        w = weight.float()
        scales = w.abs().amax(1) / 127
        step = torch.where(scales > 0, scales, torch.ones_like(scales))
        return cls(torch.round(w / step[:, None]).clamp(-127, 127).to(torch.int8), scales)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scales).to(x.dtype)


class RescoredHead:
    """The output projection: every logit from an Int8Linear (bfloat16 out: steps of 0.125 at
    logits of 16-32, so near-ties would flip), then the tokens within `margin` of the best, at most
    `max_rescored`, recomputed exactly from the dense weight. Greedy picks the same token as the
    dense head whenever the int8 error stays under margin / 2 (measured on SmolLM2: at most 0.97
    over 120 positions of five prompts)."""

    def __init__(self, weight: torch.Tensor, margin: float = 3.0, max_rescored: int = 64):
        self.weight = weight  # [vocab, hidden], dense: the tied embedding, kept for lookups anyway
        self.approx = Int8Linear.from_dense(weight)
        self.shape = tuple(weight.shape)
        self.margin, self.max_rescored = margin, max_rescored

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.approx(x).float()  # [n, vocab]
        top, idx = logits.topk(self.max_rescored, dim=-1)  # [n, k]
        near = top >= top[:, :1] - self.margin
        exact = torch.einsum("nh,nkh->nk", x.float(), self.weight[idx].float())  # [n, k]
        logits.scatter_(1, idx, torch.where(near, exact, top))
        return logits.to(x.dtype)
