"""FLOPs of one training step of each method at the papers' scale, counted without weights.

SiT-XL/2 on 32x32x4 latents (256 tokens), 1000 classes, batch 256: the model is built on the meta
device (no memory is allocated), and one step's forward and backward of the method's own loss runs
under torch.utils.flop_counter.FlopCounterMode (matmuls, attention, convolutions; elementwise work
counts 0). The counting differs from a training run only where a step needs what the trainer gives:
  sra        its teacher is the trainer's EMA: a meta copy of the backbone stands in;
  repa, erw  their target encoder is REPA's DINOv2-B features (768 wide, one per token) pre-computed
             and read from the batch, as `--repa-encoder precomputed:...` trains; the encoder's own
             forward is not counted (the paper's pre-computes it too); erw is counted in its phase 2
             (REPA at its depth with the decaying weight), the rest of its run;
  ct, act    as their defaults (act: the generator's step; its discriminator's step is not counted);
  maskdit    its masked stage.
Index-value checks (host syncs, impossible on meta) are off while counting.

  python bench/flops_at_scale.py            # prints the table
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

MODEL, LATENT, CLASSES, BATCH = "SiT-XL/2", (4, 32, 32), 1000, 256
PEAK_TFLOPS = 989.0  # H200 (and H100 SXM) dense bf16, the bound's denominator
FEATURES = ("repa_dinov2", 768)
# How a row at scale differs from the method's digits row (printed under the table).
NOTES = {"repa": "reads pre-computed DINOv2-B features (its digits run encodes live)",
         "erw": "phase 2, pre-computed features",
         "sra": "teacher forward on a meta copy of the backbone",
         "act": "the generator's step only (its discriminator's step, in the digits count, is not counted)"}


def _method(name: str, model):
    from effkernels.models.methods import build_method
    from effkernels.models.methods import encoders as enc
    from effkernels.models.methods.erw import ERW
    from effkernels.models.methods.repa import REPA
    from effkernels.models.methods.sra import SRA

    args = argparse.Namespace()
    if name in ("repa", "erw"):
        feats = [(FEATURES[0], enc.Precomputed(*FEATURES))]
        m = (REPA if name == "repa" else ERW)(model, args, encoders=feats)
        return m
    if name == "sra":
        return SRA(model, args, teacher=copy.deepcopy(model))
    return build_method(name, model, args)


def step_flops(name: str) -> float:
    """FLOPs of one training step of method `name` at MODEL x BATCH (forward + backward of its loss)."""
    from effkernels.models.backbone.configs import build

    with torch.device("meta"):
        model = build(MODEL, input_size=LATENT[1], in_channels=LATENT[0], num_classes=CLASSES)
        method = _method(name, model)
    batch = {"x": torch.randn(BATCH, *LATENT, device="meta"),
             "y": torch.randint(0, CLASSES, (BATCH,), device="meta"), "generator": None,
             FEATURES[0]: torch.randn(BATCH, model.num_patches, FEATURES[1], device="meta")}
    step = method.warmup_steps if name == "erw" else 0  # ERW: its first phase-2 step
    with FlopCounterMode(display=False) as fc:
        out = method.loss(model, batch, step)
        out["loss"].backward()
    return float(fc.get_total_flops())


def table(methods) -> dict[str, float | str]:
    """{method: FLOPs per step, or the reason it could not be counted}."""
    prev = os.environ.get("EFFKERNELS_CHECK_INDICES")
    os.environ["EFFKERNELS_CHECK_INDICES"] = "0"
    try:
        out = {}
        for m in methods:
            try:
                out[m] = step_flops(m)
            except Exception as e:  # reported in the table, not hidden: the row then says why
                out[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return out
    finally:
        if prev is None:
            os.environ.pop("EFFKERNELS_CHECK_INDICES", None)
        else:
            os.environ["EFFKERNELS_CHECK_INDICES"] = prev


def main(argv=None) -> int:
    from effkernels.models.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="sit,tread,maskdit,repa,erw,sra,ct,act")
    a = p.parse_args(argv)
    names = [m for m in a.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}")
    res = table(names)
    base = res.get("sit") if isinstance(res.get("sit"), float) else None
    print(f"| method | TFLOP per step ({MODEL}, {LATENT[1]}x{LATENT[2]}x{LATENT[0]}, batch {BATCH}) | vs sit "
          f"| step-time bound at {PEAK_TFLOPS:.0f} TFLOP/s |")
    print("|---|---|---|---|")
    for m, v in res.items():
        if isinstance(v, float):
            ratio = f"{v / base:.2f}" if base else "-"
            print(f"| {m} | {v / 1e12:.1f} | {ratio} | {v / (PEAK_TFLOPS * 1e12) * 1e3:.0f} ms |")
        else:
            print(f"| {m} | not counted: {v} | - | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
