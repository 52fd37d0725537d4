"""More than one process: data parallel training on PyTorch's own engine (torch.distributed).

    torchrun --nproc_per_node 2 train.py ...       # two processes on this machine

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT);
`World.start` joins them: `gloo` on CPUs, `nccl` on CUDA GPUs. Every rank holds the whole model
(DistributedDataParallel) or a shard of it (FSDP2's `fully_shard`, with --fsdp) and reads its own
share of each batch; gradients are summed across ranks in backward. Rank 0 alone writes files and
prints; the others wait at a barrier. Without torchrun, World() is the single process: every
method is a no-op, so the trainer reads the same either way. Under torchrun even one process joins
a process group and trains through the same wrappers, which is how a machine with one GPU checks
the NCCL and FSDP paths (`torchrun --nproc_per_node 1 train.py --fsdp ...`).
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    joined: bool = False  # in a process group (under torchrun, even a group of one)

    @classmethod
    def start(cls, device):
        """Join the processes torchrun started (a one-process World without torchrun).
        Returns the World and the device this rank trains on (cuda:LOCAL_RANK on GPUs)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it
            return cls(), device
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                    if device.type == "cuda" else None)
        return cls(rank, world_size, local_rank, joined=True), device

    @property
    def distributed(self):
        return self.joined

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def sum(self, values, device):
        """Element-wise sum over ranks of a list of numbers (one all-reduce)."""
        if not self.distributed:
            return list(values)
        # float64 for exact counts; gloo reduces CPU tensors only (and MPS has no float64)
        tensor = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value):
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def shard(self, samples):
        """This rank's part of a list of sample indices: contiguous, sizes differing by at most one."""
        size, extra = divmod(len(samples), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return samples[start:start + size + (self.rank < extra)]

    def wrap(self, model, fsdp=False):
        """The model as the ranks train it: DistributedDataParallel, or sharded with FSDP2."""
        if not self.distributed:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            core = model.get_base_model() if hasattr(model, "get_base_model") else model
            for layer in core.model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel
        # The only buffers are the RoPE tables, the same on every rank by construction: left on, DDP
        # would send them from rank 0 before every forward (torch 2.13 renamed the switch).
        import inspect
        options = inspect.signature(DistributedDataParallel).parameters
        switch = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
        return DistributedDataParallel(model, device_ids=[model.device] if model.device.type == "cuda" else None,
                                       **{switch: False})

    def no_sync(self, model, last):
        """Around each micro-batch's forward and backward: gradients are exchanged between the ranks
        only after the step's last micro-batch (before it they only add up locally)."""
        if not self.distributed:
            return contextlib.nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else model.no_sync()

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (FSDP2 shards in place: no wrapper)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
