"""Multi-process data parallelism: process group from torchrun's environment, gradient averaging.

Gradients are averaged with one coalesced all_reduce per step after backward, rather than by wrapping
the model in DistributedDataParallel. The methods are why: several own trainable modules that run
outside the backbone's forward (REPA's projector, MaskDiT's decoder), call the backbone more than
once per step or only partly (SRA's teacher with stop_at, ERW's warm-up), or leave parameters unused
on some steps; DDP's reducer needs find_unused_parameters and one forward per backward for those.
An explicit all_reduce over every trainable parameter is correct for all of them, and on the small
models this library trains on CPU the lost compute/communication overlap is negligible.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


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


@torch.no_grad()
def broadcast_params(params) -> None:
    """Copy rank 0's parameters (and buffers) to every rank, so all start from the same weights."""
    if not current().enabled:
        return
    tensors = [p.data for p in params]
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.broadcast(flat, 0)
    for t, f in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


@torch.no_grad()
def average_gradients(params) -> None:
    """grad <- mean over ranks of grad, for every parameter that requires grad.

    A parameter without a grad on this rank counts as zero (a method may skip a module on a step),
    and is given a zero grad first so that every rank passes the same flat buffer to all_reduce.
    """
    info = current()
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # one all_reduce per dtype/device group keeps the collective count at one for the usual fp32 model
    groups: dict = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= info.world_size
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)


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
    info = current()
    if not info.enabled:
        return value
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.item() / info.world_size
