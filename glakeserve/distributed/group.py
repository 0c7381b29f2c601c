"""The ranks' collectives: torch.distributed with NCCL on GPUs and gloo on CPUs, every collective
bounded by the group's timeout (a rank that stops answering makes the others fail, not hang)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from glakeserve.distributed.shard import TPShard


class TPGroup:
    """One process group per engine (the default group of its processes: one tensor-parallel
    engine per process at a time)."""

    def __init__(self, shard: TPShard, store_file: str, device: torch.device, timeout_s: float):
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process: one tensor-parallel "
                               "engine per process at a time (close the other first)")
        self.shard = shard
        self.rank, self.size = shard.rank, shard.size
        self.device = device
        nccl = device.type == "cuda"
        if nccl:
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (see the device notes)
        dist.init_process_group("nccl" if nccl else "gloo", init_method=f"file://{store_file}",
                                rank=self.rank, world_size=self.size, timeout=timedelta(seconds=timeout_s),
                                device_id=device if nccl else None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (x: the destination, shaped like rank 0's)."""
        dist.broadcast(x, src=0)
        return x

    def gather_cat(self, x: torch.Tensor) -> torch.Tensor | None:
        """[n, k] on each rank -> [n, size * k] on rank 0, ranks side by side; None elsewhere."""
        if self.rank:
            dist.gather(x, None, dst=0)
            return None
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
