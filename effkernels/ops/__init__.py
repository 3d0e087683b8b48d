"""Public functional ops: validation, backend dispatch, autograd and torch.library registration."""
from .adaln import gated_residual, gated_residual_modulate_layernorm, modulate_layernorm
from .align import (cosine_alignment_loss, mse_alignment_loss, per_token_cosine, projected_cosine,
                    projected_cosine_loss, smooth_l1_alignment_loss)
from .attention import lengths_to_cu_seqlens, visible_attention
from .rmsnorm import gated_residual_rmsnorm_modulate, rmsnorm_modulate
from .rope import grid_positions, rope2d
from .routing import (check_route_index, complement, draw_route, inverse, route_gather, route_scatter,
                      segment_expand)
from .swiglu import swiglu

__all__ = [
    "check_route_index", "complement", "cosine_alignment_loss", "draw_route", "gated_residual",
    "gated_residual_modulate_layernorm", "inverse", "lengths_to_cu_seqlens", "modulate_layernorm",
    "mse_alignment_loss", "per_token_cosine", "projected_cosine", "projected_cosine_loss", "route_gather",
    "route_scatter", "segment_expand", "smooth_l1_alignment_loss", "visible_attention",
    "gated_residual_rmsnorm_modulate", "rmsnorm_modulate",
    "grid_positions", "rope2d", "swiglu",
]
