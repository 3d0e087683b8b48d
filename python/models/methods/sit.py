"""SiT: the baseline every method is measured against (Ma et al., willisma/SiT).

The linear-interpolant flow-matching loss with velocity prediction, t ~ U(0, 1), on every token;
nothing else. It is `Method`'s default objective, so this file only names it.
"""
from __future__ import annotations

from .base import Method
from .registry import register_method


@register_method("sit")
class SiT(Method):
    """SiT's flow-matching loss (effkernels.models.objectives.FlowMatching), ODE sampling."""
