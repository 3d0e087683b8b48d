"""Exponential moving average of the generator: the backbone and the method's generator modules."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA copies of named modules (parameters averaged, buffers copied), with optional warm-up.

    decay_k = min(decay, (1 + k) / (10 + k)) with warm-up: early on the average follows the weights
    closely, so a short run's EMA is not dominated by the initialisation.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float, warmup: bool = True):
        self.models = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
        self.decay, self.warmup = decay, warmup

    @property
    def model(self) -> nn.Module:
        """The EMA backbone."""
        return self.models["backbone"]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        d = self.decay_at(step)
        for k, m in modules.items():
            e = self.models[k]
            ep, mp = list(e.parameters()), [p.detach() for p in m.parameters()]
            if ep:
                torch._foreach_lerp_(ep, mp, 1 - d)  # one fused update over all parameters
            for eb, b in zip(e.buffers(), m.buffers()):
                eb.copy_(b)

    def state_dict(self) -> dict:
        return {k: m.state_dict() for k, m in self.models.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, m in self.models.items():
            m.load_state_dict(state[k])
