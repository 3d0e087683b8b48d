"""DiT: the DDPM objective DiT trains with (effkernels.models.objectives.ddpm), for `DiT-*` configs.

Epsilon prediction on the 1000-step linear beta schedule, t uniform over the steps, the loss
IDDPM's "hybrid": the eps MSE plus the variational-bound term of the learned-range variance, with
the mean held fixed in the bound (a model without learned sigma trains the MSE alone and samples
with the fixed large variance). Sampling is DDPM ancestral (DiT's 250 respaced steps by default) or
DDIM (`effkernels-sample --sampler ddpm|ddim`, default ddpm on 250 steps); the trainer's evaluation
uses DDIM at --eval-steps (deterministic, as its Heun is for the flow models). `effkernels-train --model DiT-*` picks this method unless --method says otherwise.
"""
from __future__ import annotations

from ..interop.official import Interop
from ..objectives.ddpm import NUM_STEPS, DDPMObjective, GaussianDiffusion
from .base import Method
from .registry import register_method


@register_method("dit")
class DiTObjective(Method):
    """DiT's DDPM loss (eps MSE + L_vb on the learned variance), DDPM/DDIM sampling."""

    owns_objective = True

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        self.ddpm = DDPMObjective(GaussianDiffusion(learn_sigma=bool(getattr(model, "learn_sigma", True))))
        if model is not None:
            # What the network predicts, read by effkernels.models.sampling.samplers (and deep-copied into the
            # EMA): sample() runs DDPM/DDIM on it, so Method's default sampler and TREAD's both work.
            model.interop = Interop("dit", "eps", f"DDPM steps 0..{NUM_STEPS - 1} (0 = least noise)", None,
                                    "effkernels")

    def objective(self, model, batch, step, options):
        return self.ddpm.loss(model, batch["x"], batch["y"], batch.get("generator"),
                              t=batch.get("t"), noise=batch.get("noise"), **options)
