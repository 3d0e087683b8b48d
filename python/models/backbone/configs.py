"""Named backbone configs and build(name).

DiT-{S,B,L,XL}/{2,4,8} and SiT-*/*: DiT's backbone (LayerNorm, GELU MLP, sin-cos positions).
LightningDiT-{B,L,XL,1p0B,1p6B}/{1,2}: LightningDiT's (hustvl/LightningDiT) published widths, depths
and heads with its release's block (RMSNorm with a learned weight, SwiGLU MLP of hidden
int(2/3 * 4D), 2-D axial RoPE on q and k beside the fixed sin-cos embedding, no QK-norm).
tiny/{1,2,4} and LightningDiT-tiny/{1,2,4}: the CPU models for the 8x8x1 digits data set.
"""
from __future__ import annotations

from .network import DiT

# size -> (depth, hidden_size, num_heads)
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

# LightningDiT size -> (depth, hidden_size, num_heads); its release's block options.
LIGHTNING_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "1p0B": (24, 1536, 24),
                   "1p6B": (28, 1792, 28)}
LIGHTNING = {"norm": "rmsnorm", "mlp": "swiglu", "pos": "sincos+rope2d", "qk_norm": False}

# Tiny CPU models for the 8x8x1 digits data set.
TINY = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=64, depth=6, num_heads=4)


def _config(depth: int, hidden_size: int, num_heads: int, patch_size: int, **defaults):
    def make(**overrides) -> DiT:
        kw = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **defaults)
        kw.update(overrides)
        return DiT(**kw)
    return make


# The official DiT predicts a learned variance (learn_sigma=True); SiT's flow matching does not.
CONFIGS = {}
for _family, _learn_sigma in (("DiT", True), ("SiT", False)):
    for _size, (_depth, _width, _heads) in SIZES.items():
        for _p in (2, 4, 8):
            CONFIGS[f"{_family}-{_size}/{_p}"] = _config(_depth, _width, _heads, _p, learn_sigma=_learn_sigma)
for _p in (1, 2, 4):
    CONFIGS[f"tiny/{_p}"] = _config(TINY["depth"], TINY["hidden_size"], TINY["num_heads"], _p,
                                    input_size=TINY["input_size"], in_channels=TINY["in_channels"],
                                    num_classes=TINY["num_classes"])
    CONFIGS[f"LightningDiT-tiny/{_p}"] = _config(TINY["depth"], TINY["hidden_size"], TINY["num_heads"], _p,
                                                 input_size=TINY["input_size"], in_channels=TINY["in_channels"],
                                                 num_classes=TINY["num_classes"], **LIGHTNING)
for _size, (_depth, _width, _heads) in LIGHTNING_SIZES.items():
    for _p in (1, 2):
        CONFIGS[f"LightningDiT-{_size}/{_p}"] = _config(_depth, _width, _heads, _p, **LIGHTNING)


def build(name: str, **overrides) -> DiT:
    """A model from a named config, e.g. build("SiT-XL/2") or build("tiny/2", num_classes=10)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name](**overrides)
