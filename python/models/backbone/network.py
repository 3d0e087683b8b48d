"""DiT / SiT backbone built from effkernels.nn: adaLN-Zero transformer on latent patches.

Follows the layout of the original DiT models.py (same parameter names, so official checkpoints load
unchanged through effkernels.models.interop.official), with the backbone options of LightningDiT
(norm, mlp, pos, qk_norm: docs/backbones.md) and these additions used by the training methods:
  - hidden states at chosen depths (REPA, ERW, SRA), blocks numbered 1..depth, "depth d" = output
    of block d; `stop_at=d` runs blocks 1..d only (SRA's teacher);
  - TREAD routes: `routes=[Route(start, end, ratio)]` runs blocks start..end on a random subset of
    tokens per sample, the others skip them and re-enter unchanged; `model.draw_routes(...)` draws
    the subsets beforehand (what torch.compile needs);
  - MaskDiT's encoder: `keep_idx` (B, K) runs the whole network on those tokens only and returns
    tokens (B, K, p*p*C_out) instead of an image;
  - per-sample token budgets: a route's idx or keep_idx may be an effkernels.nn.routing.TokenPack
    (a different count per sample), and the blocks then run on the kept tokens packed without
    padding, (T, D) with cu_seqlens, attention within each sample, conditioning broadcast per sample.
Every token plan is a selection that backbone.tokens.Tokens applies: the states, their grid positions
(RoPE) and the pack move together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from effkernels import ops
from effkernels.nn import DiTBlock, ModulatedLayerNorm, ModulatedRMSNorm
from effkernels.nn._common import check_backend, check_positive_int, check_ratio
from effkernels.nn.routing import TokenPack, keep_count

from .guidance import cfg_forward
from .positions import get_2d_sincos_pos_embed
from .tokens import Tokens

#################################################################################
#                     Embedding layers for patches, timesteps and labels         #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: (B, C, H, W) -> (B, (H/p)*(W/p), D), row-major order."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"x must be (B, C, {self.input_size}, {self.input_size}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar times -> vectors: sinusoidal features (256) -> Linear - SiLU - Linear. t is used as given
    (SiT's raw t in [0, 1], DiT's integer step in [0, 1000))."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) -> (B, dim) float32: [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    When dropout_prob > 0 the table has one extra row, the null class at index num_classes, which
    dropped labels (and CFG's unconditional half) use. As in DiT, no null row when dropout_prob is 0.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def has_null_class(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random (prob dropout_prob), or where force_drop_ids == 1."""
        if not self.has_null_class:
            raise ValueError("label dropout needs a null class: build the model with class_dropout_prob > 0")
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(f"force_drop_ids must have the labels' shape {tuple(labels.shape)}, "
                                 f"got {tuple(force_drop_ids.shape)}")
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


#################################################################################
#                                 Final layer                                   #
#################################################################################

class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm (or RMSNorm, norm="rmsnorm") then Linear to patch pixels: (B, N, D) -> (B, N, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, norm: str = "layernorm",
                 backend: str | None = None):
        super().__init__()
        self.norm_final = (ModulatedLayerNorm(hidden_size, eps=1e-6, backend=backend) if norm == "layernorm"
                           else ModulatedRMSNorm(hidden_size, eps=1e-6, backend=backend))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, pack: TokenPack | None = None) -> torch.Tensor:
        return modulated_linear(x, c, self.adaLN_modulation, self.norm_final, self.linear, pack)


def modulated_linear(x: torch.Tensor, c: torch.Tensor, modulation, norm, linear,
                     pack: TokenPack | None = None) -> torch.Tensor:
    """linear(norm(x, shift, scale)) with (shift, scale) = modulation(c).chunk(2): the final layer's
    arithmetic, which MaskDiT's bridge shares. x (B, N, D) with c (B, C), or x (T, D) packed by
    `pack` (a TokenPack), each row taking its sample's modulation (computed once per sample)."""
    mod = modulation(c)
    if pack is not None:
        mod, x = pack.expand(mod).unsqueeze(0), x.unsqueeze(0)
    shift, scale = mod.to(x.dtype).chunk(2, dim=-1)  # strided views
    out = linear(norm(x, shift, scale))
    return out if pack is None else out[0]


#################################################################################
#                                 Core DiT model                                #
#################################################################################

# "sincos": DiT's fixed absolute embedding added to the tokens; "rope2d": 2-D axial rotary q/k in every
# block, no absolute embedding (DDT); "sincos+rope2d": both, as LightningDiT's release.
POSITIONS = ("sincos", "rope2d", "sincos+rope2d")


def _basic_init(module):
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)


@dataclass(frozen=True)
class Route:
    """TREAD route: blocks start..end (1-based, inclusive) see only K = N - round(N * ratio) tokens.

    idx: None (DiT.forward draws the kept tokens itself, from its `generator`), or a pre-drawn keep
        index (B, K) int32/int64, K distinct positions per sample. Pre-drawn routes are what
        torch.compile needs: draw them outside the compiled region (`route.draw(...)`,
        `DiT.draw_routes(...)`), pass them in; forward then draws nothing and builds nothing.
        Or a TokenPack (a different count per sample, drawn by the caller): ratio is then only a
        label, the pack's counts decide, and the routed blocks run on packed rows.
    checked: idx was drawn by ops.draw_route, valid by construction, so forward skips its value
        check (a host sync); an index a user builds stays checked.
    """
    start: int
    end: int
    ratio: float = 0.5
    # Not compared or hashed (a tensor has no truth value) and not printed (it is B x K numbers).
    idx: torch.Tensor | TokenPack | None = field(default=None, compare=False, repr=False)
    checked: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        check_positive_int("Route.start", self.start)
        check_positive_int("Route.end", self.end)
        if self.end < self.start:
            raise ValueError(f"Route.end ({self.end}) must be >= Route.start ({self.start})")
        check_ratio("Route.ratio", self.ratio)
        if self.idx is not None and not isinstance(self.idx, TokenPack) and (
                not isinstance(self.idx, torch.Tensor) or self.idx.dim() != 2
                or self.idx.dtype not in (torch.int32, torch.int64)):
            got = tuple(self.idx.shape) if isinstance(self.idx, torch.Tensor) else type(self.idx).__name__
            raise TypeError(f"Route.idx must be None, a (B, K) int32/int64 tensor or a TokenPack, got {got}")

    def keep(self, num_tokens: int) -> int:
        """K, the tokens this route's blocks process out of num_tokens: N - round(N * ratio)."""
        return keep_count(num_tokens, self.ratio)

    def draw(self, batch: int, num_tokens: int, *, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Route:
        """This route with a fresh sorted keep index (batch, K) int64 drawn from `generator`."""
        idx = ops.draw_route(batch, num_tokens, self.keep(num_tokens), generator=generator, device=device)
        return replace(self, idx=idx)


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero blocks (DiT, and SiT with learn_sigma=False).

    forward(x (B, C, H, W), t (B,) or scalar, y (B,) int or None) -> (B, C_out, H, W); see forward.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = False, qk_norm: bool | str = False,
                 norm: str = "layernorm", mlp: str = "gelu", pos: str = "sincos", backend: str | None = None):
        super().__init__()
        for name, v in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads),
                        ("num_classes", num_classes)):
            check_positive_int(name, v)
        if input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide input_size={input_size}")
        if pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS}, got {pos!r}")
        if "sincos" in pos and hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {hidden_size}")
        check_ratio("class_dropout_prob", class_dropout_prob)
        if not isinstance(learn_sigma, bool):
            raise TypeError(f"learn_sigma must be a bool, got {type(learn_sigma).__name__}")
        self.backend = check_backend(backend)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.num_heads, self.num_classes = hidden_size, depth, num_heads, num_classes
        self.learn_sigma = learn_sigma
        # qk_norm: REPA's --qk-norm (True: per-head LayerNorm of q and k) or LightningDiT's "rmsnorm"
        self.qk_norm, self.norm_kind, self.mlp_kind, self.pos_kind = qk_norm, norm, mlp, pos
        self.mlp_ratio = mlp_ratio
        self.out_channels = in_channels * 2 if learn_sigma else in_channels

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size
        if "sincos" in pos:
            # Fixed, not learned; persistent so official checkpoints (which store it) load strictly.
            self.register_buffer("pos_embed", get_2d_sincos_pos_embed(hidden_size, grid).unsqueeze(0))  # (1, N, D)
        else:  # rope2d alone: positions enter only through the rotary q/k of every block
            self.pos_embed = None
        # (N, 2) int64 grid positions, the rotary op's input; they travel with the tokens a plan selects
        self.register_buffer("token_pos", ops.grid_positions(grid, grid), persistent=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm, norm=norm, mlp=mlp,
                     rope=self.uses_rope, backend=backend)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm, backend=backend)
        self.initialize_weights()

    @property
    def uses_rope(self) -> bool:
        """Whether the blocks rotate q and k by the tokens' grid positions (pos "rope2d" or "sincos+rope2d")."""
        return "rope2d" in self.pos_kind

    @property
    def num_patches(self) -> int:
        return self.x_embedder.num_patches

    def initialize_weights(self):
        self.apply(_basic_init)

        # Patch embedding initialised like a linear layer over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self._zero_init(range(1, self.depth + 1), final_layer=True)

    def _zero_init(self, depths, final_layer: bool) -> None:
        """adaLN-Zero: every block starts as the identity, the output as zero."""
        for d in depths:
            nn.init.constant_(self.blocks[d - 1].adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.blocks[d - 1].adaLN_modulation[-1].bias, 0)
        if final_layer:
            for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
                nn.init.constant_(lin.weight, 0)
                nn.init.constant_(lin.bias, 0)

    def reset_blocks(self, depths, *, final_layer: bool = False) -> None:
        """Fresh weights for blocks `depths` (1-based) and optionally the final layer, as at
        construction (xavier linears, adaLN-Zero). ERW's transition restarts the blocks above its
        warmed region this way."""
        for d in depths:
            self.blocks[d - 1].apply(_basic_init)
        if final_layer:
            self.final_layer.apply(_basic_init)
        self._zero_init(depths, final_layer)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), in the token order and patch layout of unpatchify."""
        p, h = self.patch_size, self.x_embedder.grid_size
        B, C = imgs.shape[:2]
        x = imgs.reshape(B, C, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * h, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, h = self.patch_size, self.x_embedder.grid_size
        c = x.shape[-1] // (p * p)
        if x.dim() != 3 or x.shape[1] != h * h or c * p * p != x.shape[-1]:
            raise ValueError(f"x must be (B, {h * h}, p*p*C) with p={p}, got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
              force_drop_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens with positions (B, N, D) and the conditioning vector c (B, D)."""
        B = x.shape[0]
        tokens = self.x_embedder(x)  # (B, N, D)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or shaped (B,)=({B},), got {tuple(t.shape)}")
        if y is None:
            if not self.y_embedder.has_null_class:
                raise ValueError("y=None (unconditional) needs a null class: class_dropout_prob > 0")
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        if y.shape != (B,):
            raise ValueError(f"y must be shaped (B,)=({B},), got {tuple(y.shape)}")
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        return tokens, c

    def _check_plan(self, return_hidden, stop_at, routes):
        last = self.depth if stop_at is None else stop_at
        if isinstance(return_hidden, int):
            return_hidden = (return_hidden,)
        if isinstance(routes, Route):
            routes = (routes,)
        if stop_at is not None:
            if not isinstance(stop_at, int) or isinstance(stop_at, bool) or not 1 <= stop_at <= self.depth:
                raise ValueError(f"stop_at must be an int in [1, {self.depth}], got {stop_at!r}")
            if not return_hidden:
                raise ValueError("stop_at skips the output layer: ask for return_hidden, or it computes nothing")
        want = set()
        for d in return_hidden or ():
            if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= last:
                raise ValueError(f"return_hidden depths must be ints in [1, {last}], got {d!r}")
            want.add(d)
        routes = list(routes or ())
        prev_end = 0
        for r in routes:
            if not isinstance(r, Route):
                raise TypeError(f"routes must hold Route objects, got {type(r).__name__}")
            if r.end > self.depth:
                raise ValueError(f"route {r} ends after the last block ({self.depth})")
            if r.start <= prev_end:
                raise ValueError(f"routes must be sorted and non-overlapping, got {routes}")
            prev_end = r.end
        return want, last, routes

    def draw_routes(self, routes, batch: int, *, num_tokens: int | None = None,
                    generator: torch.Generator | None = None, device=None) -> list[Route]:
        """Draw every route's keep index now, outside forward: -> routes with idx set, for forward.

        routes: a Route or a sorted, non-overlapping sequence (any idx they carry is replaced);
        batch: B; num_tokens: the tokens the routes see (default num_patches; with keep_idx, its K);
        generator/device: where to draw (device defaults to the model's). One draw per route, in
        order: the same draws forward(routes=routes, generator=generator) makes itself.
        """
        _, _, routes = self._check_plan((), None, routes)
        n = self.num_patches if num_tokens is None else num_tokens
        device = self.token_pos.device if device is None else device
        return [r.draw(batch, n, generator=generator, device=device) for r in routes]

    def _route_indices(self, routes, batch, num_tokens, device, generator):
        """{start: (end, idx or None)}: a pre-drawn idx checked once (eager), else drawn here."""
        plan = {}
        for i, r in enumerate(routes):
            idx = r.idx
            if idx is None:
                # Drawn here: valid by construction. ratio 0 routes nothing (idx None: no copy).
                if r.ratio > 0:
                    idx = ops.draw_route(batch, num_tokens, r.keep(num_tokens), generator=generator, device=device)
            elif isinstance(idx, TokenPack):
                idx.check(batch, num_tokens, f"routes[{i}].idx")  # built by TokenPack: valid by construction
            else:
                want = (batch, r.keep(num_tokens))
                if tuple(idx.shape) != want:
                    raise ValueError(f"routes[{i}].idx must have shape (B, N - round(N * ratio))={want} "
                                     f"for N={num_tokens}, ratio={r.ratio}, got {tuple(idx.shape)}")
                if not r.checked:  # shape and dtype are checked above and in Route
                    ops.check_route_index(idx, num_tokens, batch=batch, name=f"routes[{i}].idx")
            plan[r.start] = (r.end, idx)
        return plan

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                return_hidden=(), stop_at: int | None = None, routes=None, keep_idx: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, generator: torch.Generator | None = None):
        """Predict the target for noisy latents.

        x: (B, C, H, W) latents; t: (B,) or scalar times, used as given; y: (B,) class labels
            (None = all null class). Labels drop to the null class with prob class_dropout_prob in
            training mode, or exactly where force_drop_ids == 1.
        return_hidden: depths d (1-based; an int or a sequence) whose block outputs to return as
            {d: (B, N, D)}. Inside a route the routed tokens are filled in with their values from
            before the route.
        stop_at: run blocks 1..stop_at only; the output is None (needs return_hidden).
        routes: TREAD routes (a Route or a sorted, non-overlapping sequence). A Route without idx
            is drawn here, one draw each from `generator` (a torch.Generator on x's device; None =
            the global RNG); a Route with idx (pre-drawn: `self.draw_routes(routes, B, generator=g)`
            or `Route(3, 9, 0.5).draw(B, N)`) uses that index, (B, N - round(N * ratio)), checked
            once per forward in eager mode. Pre-drawn routes are the form for torch.compile
            (fullgraph): forward then draws nothing. Applied whenever given: turning routing off at
            inference is the caller's choice. A Route whose idx is a TokenPack (a count per sample)
            runs its blocks on the packed rows (T, D) and scatters them back after `end`.
        keep_idx: (B, K) int positions of the tokens the network sees (MaskDiT's encoder); the
            output is then tokens (B, K, p*p*C_out), not an image (unpatchify needs all N), and
            hidden states are (B, K, D). Checked once per forward in eager mode; routes then apply
            to the K kept tokens. A TokenPack instead (a different count per sample): the network
            runs on the packed rows and returns out (T, p*p*C_out), hidden states (T, D), row
            order the pack's; no routes then.
        Index values (range, duplicates) are checked with a host sync, skipped under torch.compile
        and when EFFKERNELS_CHECK_INDICES=0; the ops that share an index never check it again.
        Returns out, or (out, hidden) when return_hidden is non-empty.
        """
        want, last, routes = self._check_plan(return_hidden, stop_at, routes)
        be = self.backend
        h, c = self.embed(x, t, y, force_drop_ids)  # (B, N, D), (B, D)
        keep = self._check_keep(keep_idx, routes, h)  # None, (B, K) or a TokenPack
        pos = self.token_pos if self.uses_rope else None  # (N, 2): the rotary positions, if any
        tok = Tokens(h, pos).select(keep, be)  # (B, K, D) kept, or the pack's rows (T, D); positions alike
        spans = self._route_indices(routes, tok.h.shape[0], tok.h.shape[1], h.device, generator)  # {start: (end, sel)}
        outer, end = None, None  # inside a route: the tokens before it, and its last block
        hidden = {}
        for d, block in enumerate(self.blocks, start=1):
            if d > last:  # stop_at
                break
            if d in spans:
                end, sel = spans[d]
                outer, tok = tok, tok.select(sel, be)  # (B, K', D) or (T, D)
            tok = tok.with_states(block(tok.h, c, tok.pack, tok.pos))  # same shape
            if outer is not None and d == end:
                tok, outer = tok.restore(outer, be), None
            if d in want:
                hidden[d] = tok.h if outer is None else tok.restore(outer, be).h
        if stop_at is not None:
            return None, hidden
        out = self.final_layer(tok.h, c, tok.pack)  # (B, N or K, p*p*C_out), or (T, p*p*C_out)
        if keep_idx is None:
            out = self.unpatchify(out)  # (B, C_out, H, W)
        return (out, hidden) if want else out

    def _check_keep(self, keep_idx, routes, h):
        """keep_idx checked against h (B, N, D): None, a (B, K) index, or a TokenPack (no routes then)."""
        if isinstance(keep_idx, TokenPack):
            if routes:
                raise ValueError("routes cannot run inside a packed keep_idx (a TokenPack): give one token plan")
            keep_idx.check(h.shape[0], h.shape[1], "keep_idx")
        elif keep_idx is not None:
            ops.check_route_index(keep_idx, h.shape[1], batch=h.shape[0], name="keep_idx")
        return keep_idx

    @torch.no_grad()
    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, *,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batched pass: uncond + s * (cond - uncond).

        Guidance applies to the first `guided_channels` output channels (default: in_channels, so a
        learned-sigma half is passed through from the conditional branch). -> (B, C_out, H, W).
        The samplers' guidance (effkernels.models.guidance.cfg_forward) does the work.
        """
        if not self.y_embedder.has_null_class:
            raise ValueError("forward_with_cfg needs a null class: build the model with class_dropout_prob > 0")
        C = self.in_channels if guided_channels is None else guided_channels
        return cfg_forward(self, x, t, y, cfg_scale, null_class=self.num_classes, guided_channels=C)
