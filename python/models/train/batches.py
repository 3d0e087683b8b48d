"""Step-indexed batches: the global batch of every step is a function of (seed, step) only, so a
resumed run, any number of data-loader workers and any number of processes see the same batches.
Per-sample randomness (a latent folder's posterior draw, the horizontal flip) is seeded by (seed,
step, position in the global batch): sample_seed."""
from __future__ import annotations

import functools

import torch

from ..data.arrays import DataError
from ..options import SHUFFLES


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of step `step`: uniform draws with replacement from a generator seeded by
    (seed, step). Stateless, so a resumed or data-parallel run sees exactly the same batches."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randint(n, (batch_size,), generator=g)


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + 0x5EED + epoch * 7_919) % (2**63))
    return torch.randperm(n, generator=g)


def epoch_batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of `step` under per-epoch shuffling, as the official loaders (shuffle=True,
    drop_last=True): epoch e is a permutation seeded by (seed, e), cut into n // batch_size batches,
    the remainder dropped. Stateless in the step, so resume and data parallelism see the same batches."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise DataError(f"per-epoch shuffling needs at least one full batch: {n} samples < batch {batch_size}")
    epoch, pos = divmod(step, per_epoch)
    return _epoch_perm(n, seed, epoch)[pos * batch_size:(pos + 1) * batch_size]


def global_indices(n: int, batch_size: int, seed: int, step: int, shuffle: str = "replacement") -> torch.Tensor:
    if shuffle == "epoch":
        return epoch_batch_indices(n, batch_size, seed, step)
    if shuffle == "replacement":
        return batch_indices(n, batch_size, seed, step)
    raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")


def sample_seed(seed: int, step: int, position: int) -> int:
    """The seed of the sample at `position` of the global batch of `step` (posterior draw, flip)."""
    return (seed * 6_364_136_223_846_793 + step * 1_442_695_040_888_963 + position * 2_654_435_761 + 1) % (2**63)


def step_keys(n: int, batch_size: int, seed: int, step: int, *, shuffle: str, rank: int = 0,
              world: int = 1) -> list[tuple[int, int]]:
    """This rank's shard of the global batch of `step` as (index, sample seed) pairs."""
    idx = global_indices(n, batch_size, seed, step, shuffle)
    per = batch_size // world
    return [(int(idx[p]), sample_seed(seed, step, p)) for p in range(rank * per, (rank + 1) * per)]


class StepBatches(torch.utils.data.Sampler):
    """A DataLoader batch_sampler over steps start..stop-1: each batch is step_keys(step)."""

    def __init__(self, n, batch_size, seed, start, stop, *, shuffle, rank=0, world=1):
        self.kw = {"n": n, "batch_size": batch_size, "seed": seed, "shuffle": shuffle, "rank": rank, "world": world}
        self.start, self.stop = int(start), int(stop)

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            kw = self.kw
            yield step_keys(kw["n"], kw["batch_size"], kw["seed"], step, shuffle=kw["shuffle"], rank=kw["rank"],
                            world=kw["world"])


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def make_loader(ds: torch.utils.data.Dataset, batch_size: int, seed: int, start: int, stop: int, *, shuffle: str,
                rank: int = 0, world: int = 1, workers: int = 0, prefetch: int = 2, pin: bool = False):
    """A DataLoader yielding the CPU batches of steps start..stop-1 (x, y[, image]), read by `workers`
    processes, at most workers x prefetch batches ahead."""
    sampler = StepBatches(len(ds), batch_size, seed, start, stop, shuffle=shuffle, rank=rank, world=world)
    kw = {"num_workers": workers, "prefetch_factor": prefetch, "persistent_workers": False} if workers else {}
    # A generator of its own: a DataLoader iterator otherwise draws its worker base seed from the global
    # RNG, which would shift the label-dropout stream at every (re)start and break exact resume. The
    # samples' randomness does not use the worker seeds at all (see sample_seed).
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, pin_memory=pin,
                                       generator=gen, **kw)


def hflip_mask(batch_size: int, seed: int, step: int) -> torch.Tensor:
    """For in-memory data: which samples of the global batch of `step` are mirrored (each with p = 1/2)."""
    return torch.tensor([bool(torch.rand((), generator=torch.Generator().manual_seed(sample_seed(seed, step, p))) < 0.5)
                         for p in range(batch_size)])
