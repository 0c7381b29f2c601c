"""The ranks' collectives: torch.distributed with NCCL on GPUs and gloo on CPUs.

gloo's collectives block the host and time out after the group's timeout, so a rank that stops
answering makes the others fail. NCCL's return at once and run on the device: a kernel waiting for
a peer that died waits forever, and nothing on the host notices. Rank 0 therefore never blocks on
its device under NCCL (TensorParallel.wait polls, watching the other ranks' processes), and on a
failure it aborts the communicator (abort()), which ends those kernels. The group's own timeout is
a backstop there, and torch's watchdog is told not to act on it (TORCH_NCCL_ASYNC_ERROR_HANDLING=0:
by default it kills the process, and rank 0 is the user's process)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from glakeserve.distributed.shard import TPShard

NCCL_BACKSTOP_S = 60.0  # NCCL's timeout: rank 0's own (tensor_parallel_timeout) fires first


def nccl_environment() -> None:
    """Set in rank 0 before it spawns the other ranks (they inherit it) and in every rank."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (see the device notes)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # rank 0 aborts, torch's watchdog does not


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
        self.nccl = device.type == "cuda"
        if self.nccl:
            nccl_environment()
            timeout_s += NCCL_BACKSTOP_S
        dist.init_process_group("nccl" if self.nccl else "gloo", init_method=f"file://{store_file}",
                                rank=self.rank, world_size=self.size, timeout=timedelta(seconds=timeout_s),
                                device_id=device if self.nccl else None)

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

    def abort(self) -> None:
        """NCCL: tears the communicator down without waiting for its work; kernels still waiting for
        a peer return (with garbage). Every CUDA graph that holds its collectives must be destroyed
        first: NCCL (2.26 on) waits for them. Nothing for gloo, whose collectives time out."""
        if not (self.nccl and dist.is_initialized()):
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch >= 2.5
        if abort is not None:
            abort()
        else:
            dist.destroy_process_group()

    def close(self) -> None:
        """Leaves the group. NCCL: aborts rather than destroys (a destroy flushes, and may wait for
        peers that have exited); every collective of rank 0 has completed by then."""
        if self.nccl:
            self.abort()
        elif dist.is_initialized():
            dist.destroy_process_group()
