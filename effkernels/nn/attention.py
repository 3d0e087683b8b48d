"""Multi-head self-attention over the tokens it is given: dense (B, N, D) or packed (T, D).

Parameter names follow timm's Attention (qkv, proj), as DiT/SiT/REPA checkpoints store them.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ._common import check_backend, check_positive_int

QK_NORMS = ("none", "layernorm", "rmsnorm")


class VisibleAttention(nn.Module):
    """Self-attention restricted to each sample's visible tokens.

    Args:
        dim: model width D; num_heads: H, must divide D; qkv_bias: bias on the qkv projection.
        qk_norm: a norm over each head's q and k before the product: False/"none"; True/"layernorm",
            LayerNorm (eps 1e-5, weight and bias) as timm's Attention(qk_norm=True,
            norm_layer=nn.LayerNorm) that REPA's --qk-norm models use (parameters q_norm.*, k_norm.*);
            "rmsnorm", RMSNorm (eps 1e-6, weight) as LightningDiT's.
        rope: 2-D axial rotary embedding of q and k (after qk_norm) by each token's (row, column)
            position (effkernels.ops.rope2d, frequency base rope_theta); forward then needs pos.
        backend: passed to effkernels.ops.visible_attention.
    forward(x (B, N, D)) -> (B, N, D): every sample attends over its N tokens (SDPA). With rope,
        pos (N, 2) or (B, N, 2) int: the tokens' grid positions ((T, 2) for the packed form). With TREAD or
        MaskDiT the N tokens are the ones kept, gathered beforehand.
    forward(x (B, N, D), keep_idx=(B, K) int) -> (B, K, D): only the tokens keep_idx names are
        visible; they are gathered (effkernels.ops.route_gather) and attend among themselves.
    forward(x (T, D) or (1, T, D), cu_seqlens=(S + 1,) int, max_seqlen=int) -> x's shape: the visible tokens of
        S samples packed back to back; sample i owns rows cu_seqlens[i]:cu_seqlens[i + 1] and
        attention never crosses samples.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, qk_norm: bool | str = False,
                 rope: bool = False, rope_theta: float = 10000.0, backend: str | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        kind = {False: "none", True: "layernorm"}.get(qk_norm, qk_norm) if isinstance(qk_norm, bool) else qk_norm
        if kind not in QK_NORMS:
            raise ValueError(f"qk_norm must be a bool or one of {QK_NORMS}, got {qk_norm!r}")
        self.qk_norm = kind != "none"
        self.qk_norm_kind = kind
        if kind == "layernorm":
            self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        elif kind == "rmsnorm":
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6), nn.RMSNorm(self.head_dim, eps=1e-6)
        if not isinstance(rope, bool):
            raise TypeError(f"rope must be a bool, got {type(rope).__name__}")
        if rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dim, got {self.head_dim} (dim {dim} / {num_heads} heads)")
        self.rope, self.rope_theta = rope, float(rope_theta)

    def _norm_qk(self, q: torch.Tensor, k: torch.Tensor):
        """Per-head LayerNorm of q and k over the head dimension (the last), when qk_norm is on."""
        if not self.qk_norm:
            return q, k
        return self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)

    def _rope(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor | None):
        if not self.rope:
            if pos is not None:
                raise ValueError("pos is given but this attention has rope=False")
            return q, k
        if pos is None:
            raise ValueError("this attention has rope=True: give pos, the tokens' (row, column) positions")
        return ops.rope2d(q, k, pos, self.rope_theta, backend=self.backend)

    def forward(self, x: torch.Tensor, *, pos: torch.Tensor | None = None, keep_idx: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        H, Dh = self.num_heads, self.head_dim
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.dim:
            got = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"x must be a tensor with last dim {self.dim}, got {got}")
        if keep_idx is not None:
            if cu_seqlens is not None:
                raise ValueError("give keep_idx (fixed count per sample) or cu_seqlens (packed), not both")
            x = ops.route_gather(x, keep_idx, backend=self.backend)  # (B, K, D)
        if cu_seqlens is None:
            if x.dim() != 3:
                raise ValueError(f"x must be (B, N, D) without cu_seqlens, got shape {tuple(x.shape)}")
            B, N, D = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
            q, k = self._rope(*self._norm_qk(q, k), pos)
            o = ops.visible_attention(q, k, v, backend=self.backend)
            o = o.transpose(1, 2).reshape(B, N, D)
        else:
            one = x.dim() == 3 and x.shape[0] == 1  # (1, T, D): the packed rows as one sequence
            if x.dim() != 2 and not one:
                raise ValueError(f"x must be packed (T, D) or (1, T, D) with cu_seqlens, got shape {tuple(x.shape)}")
            T, D = x.shape[-2:]
            q, k, v = self.qkv(x).reshape(T, 3, H, Dh).unbind(1)  # (T, H, Dh)
            q, k = self._rope(*self._norm_qk(q, k), pos)
            o = ops.visible_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                      backend=self.backend).reshape(x.shape)
        return self.proj(o)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}" + (f", qk_norm={self.qk_norm_kind}" if self.qk_norm else "")
                + (", rope=True" if self.rope else ""))
