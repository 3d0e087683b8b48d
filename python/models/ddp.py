"""Multi-process data parallelism: the process group from torchrun's environment, and torch's
DistributedDataParallel around what the trainer optimises.

The trainer wraps one module holding the backbone and the method's trainable modules (projectors,
decoders) in DistributedDataParallel, so gradients are averaged in buckets while the backward runs,
as at scale; a discriminator with its own optimizer gets a wrapper of its own. Methods that leave
parameters without a gradient on some steps say so (Method.find_unused_parameters), and DDP then
looks for them; a parameter that no rank used keeps grad None, exactly as in a single process, so
AdamW skips it either way. Partial forwards (SRA's teacher) run on the EMA copy, outside DDP.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...); a plain run is world size 1.

    gloo for CPU tensors, nccl for CUDA ones.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    """The DistInfo of an already initialised process group (world size 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, device: torch.device, *, find_unused_parameters: bool = False):
    """`module` inside DistributedDataParallel when there is a process group, else itself.

    Module states are broadcast from rank 0 when the wrapper is built (DDP does it), so every rank
    starts from rank 0's weights. Buffers are not re-broadcast each forward (broadcast_buffers=False):
    the backbone's only buffer, the sin-cos position table, is constant.
    """
    if not current().enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.14 renamed broadcast_buffers to forward_sync_buffers (init still syncs buffers)
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters, **{no_sync: False})


def per_rank(value: torch.Tensor) -> list[float]:
    """[value on rank 0, value on rank 1, ...] of a scalar tensor; one small all_reduce."""
    info = current()
    if not info.enabled:
        return [float(value.detach())]
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
    t = torch.zeros(info.world_size, dtype=torch.float64, device=dev)
    t[info.rank] = value.detach().to(device=dev, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    info = current()
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def all_reduce_mean(value: float) -> float:
    """The mean of a Python number over ranks (for logging the global loss)."""
    vals = per_rank(torch.tensor(float(value)))
    return sum(vals) / len(vals)
