"""Tensor parallelism: one model served by N processes, one per device (rank), each holding 1/N of
every weight matrix and its own KV pool for its KV heads. tensor_parallel_size=1 never imports this.

    rank 0 (the user's process)                     ranks 1..N-1 (spawned, owned by the engine)
    -----------------------------------------       -------------------------------------------
    scheduler, KV books, prefix cache, sampler      model shard, KV pool (same geometry), no policy
    launch(step):
      pipe -> ("step", page ops, slots, lens)  ──►  replay page ops on its pool
      broadcast(token ids)                     ──►  receive token ids
      forward(shard)  <── all-reduce x 2 a layer ─►  forward(shard)
      pipe -> ("logits", n); broadcast(rows)   ──►  lm_head shard
      gather(logits shards) -> sample          ◄──  gather
    a decode step on GPUs:
      pipe -> ("replay", page ops, slots, lens, padded size)
      replay graph[size] (broadcast, forward) ──►  pad the batch as rank 0 did, replay graph[size]

Decision: rank 0 schedules and broadcasts each step's batch; the other ranks run no scheduler.
The alternative, every rank running the same deterministic scheduler on broadcast requests, would
need every rank to see every request, abort, stop string, detokenized text and timing-dependent
choice (the KV cache polls its mapping worker; async scheduling reads tokens a step late) in the
same order, and any divergence would corrupt silently. Broadcasting the batch is a few hundred
bytes a step (slot ids and lengths over a pipe, token ids through the collective group), keeps the
scheduler, sampler and server single-process code, and gives the other ranks nothing to disagree
about. Page decisions follow the same rule (journal.py): rank 0's KV cache decides, the other ranks
replay its page operations.

Transport: control messages go over one multiprocessing pipe per rank (a rank waiting for work
needs no timeout, and sees EOF when rank 0 goes away); tensors go through torch.distributed (gloo
on CPUs, NCCL on GPUs, NCCL_NVLS_ENABLE=0 in every process). A rank that raises reports its error
over its pipe and exits; rank 0 turns the failure into TensorParallelError naming the rank and the
cause, and stops the other ranks. Ranks ignore SIGINT (Ctrl-C is rank 0's to handle) and exit when
rank 0's process is gone.

Failure under NCCL (group.py): gloo's collectives block and time out; NCCL's return at once, and a
kernel waiting for a peer that died waits forever. So rank 0 never blocks on its device: it polls
a step's event (TensorParallel.wait) while it looks at the ranks' processes, and gives up after
tensor_parallel_timeout (a hung rank); a watcher thread aborts the communicator as soon as a rank's
process ends, which ends the waiting kernels and every host wait on them (the mapping worker's
unmaps among them). CUDA graphs holding collectives are destroyed before the communicator.

Decode CUDA graphs (model_runner.DecodeGraphs): NCCL collectives may be captured when every rank
captures the same sequence, so rank 0 tells the others to capture ("graphs") and every rank
captures the same sizes in the same order, each after one eager pass whose collectives pair up
outside a graph; the token-id broadcast is part of the forward, so the graph holds it too. A
decode step tells the other ranks which size rank 0 replays; they pad their batch the same way
(slots and lengths come over the pipe, token ids through the graph's broadcast).
"""

from glakeserve.distributed.shard import TPShard, check_tensor_parallel_size  # noqa: F401
