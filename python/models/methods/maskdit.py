"""MaskDiT: an encoder on the unmasked patches only, a light decoder on all of them, an MAE loss on
the masked ones.

Per sample exactly K = int(N (1 - ratio)) tokens are kept (positions added before masking). The
backbone runs all its blocks on those K tokens (keep_idx) and stops before its own final layer; a
zero-initialised bridge (LayerNorm + adaLN shift/scale + Linear D -> D_dec) maps them to the
decoder's width, a learned mask token fills the N - K masked positions, fixed sin-cos positions are
added, the decoder's adaLN-Zero blocks (effkernels.nn.DiTBlock conditioned on the backbone's c) run
on all N tokens, and the decoder's final layer predicts every patch. The decoder blocks start as the
release initialises them (and as the backbone's blocks): xavier-uniform Linear weights, zero biases,
then the adaLN modulation's last Linear (shifts, scales and gates) zeroed.

Loss: the flow objective averaged over the KEPT tokens only, plus mae_weight (0.1) x the MSE over
the MASKED tokens against the noisy input x_t, normalised per patch (mean and UNBIASED variance
over the patch's values, eps 1e-6, as the release's torch.var), unweighted. The paper trains with EDM; on our SiT ground the denoising
part is the flow loss and the MAE term stays as specified. The unmasked fine-tune stage is this
method resumed with --mask-ratio 0 (the decoder then sees no mask tokens, no MAE term). The
decoder is part of the generator: EMA-averaged and used by sampling, which runs unmasked.
The backbone's own final layer is unused by this method (find_unused_parameters).

Per-sample budgets (beyond the paper): --mask-ratio-range A:B draws each sample's ratio uniformly in
[A, B], K_b = int(N (1 - r_b)); the encoder runs on the kept tokens packed without padding
(effkernels.nn.routing.TokenPack: varlen attention within each sample, adaLN per sample broadcast to
its rows), the bridge too, and the decoder on all N. The losses average as with a fixed ratio: the
flow loss over each sample's kept tokens, the MAE over its masked ones, each a per-sample mean, then
the mean over the batch (a sample that masks nothing, r_b = 0, adds 0 to the MAE mean).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effkernels import ops
from effkernels.nn import DiTBlock, ModulatedLayerNorm, ModulatedRMSNorm
from effkernels.nn.routing import TokenPack, draw_ratios

from ..backbone.network import modulated_linear
from ..backbone.positions import get_2d_sincos_pos_embed
from ..objectives.flow import interpolate, velocity_target
from ..objectives.prediction import mean_prediction
from ..options import add_options, opt, read_options
from ..sampling.samplers import sample
from .base import ConfigError, Method, draw_label_dropout
from .registry import register_method
from .tread import parse_ratio_range

# Widths from which the paper's decoder (8 blocks of width 512, 16 heads) is the default: the DiT sizes.
PAPER_DECODER_FROM_WIDTH = 384


class AdaLNLinear(nn.Module):
    """LayerNorm (no affine; or RMSNorm with a weight, norm="rmsnorm", as the backbone's) modulated
    by c, then a Linear; zero-initialised so it starts at 0. MaskDiT's bridge (D -> D_dec) and its
    decoder's final layer (D_dec -> p*p*C_out), both conditioned on the backbone's c (cond_dim)."""

    def __init__(self, dim: int, out: int, cond_dim: int, norm: str = "layernorm", backend: str | None = None):
        super().__init__()
        self.norm = (ModulatedRMSNorm(dim, eps=1e-6, backend=backend) if norm == "rmsnorm"
                     else ModulatedLayerNorm(dim, eps=1e-6, backend=backend))
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        for lin in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, pack: TokenPack | None = None) -> torch.Tensor:
        return modulated_linear(x, c, self.adaLN_modulation, self.norm, self.linear, pack)


class MaskDecoder(nn.Module):
    """Bridge, mask token, positions, adaLN-Zero blocks and final layer over all N tokens.

    The decoder takes the backbone's options: its norm (LayerNorm / RMSNorm in the blocks, bridge
    and final layer), MLP (GELU / SwiGLU) and positions: the fixed sin-cos embedding added after
    the mask tokens fill in when the backbone has one, the rotary q/k of every block by the full
    grid's positions when the backbone has RoPE. QK-norm stays the encoder's (the release's
    decoder has none)."""

    def __init__(self, backbone, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        sincos, rope = "sincos" in backbone.pos_kind, backbone.uses_rope
        if sincos and width % 4:
            raise ConfigError(f"--decoder-width must be a multiple of 4 (sin-cos positions), got {width}")
        if width % num_heads:
            raise ConfigError(f"--decoder-width {width} is not divisible by the decoder's {num_heads} heads")
        if rope and (width // num_heads) % 2:
            raise ConfigError(f"--decoder-width {width} over {num_heads} heads gives an odd head dim; RoPE needs it even")
        d, p, norm = backbone.hidden_size, backbone.patch_size, backbone.norm_kind
        self.num_tokens, self.width = backbone.num_patches, width
        self.bridge = AdaLNLinear(d, width, d, norm, backbone.backend)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        if sincos:
            self.register_buffer("pos_embed", get_2d_sincos_pos_embed(width, backbone.x_embedder.grid_size).unsqueeze(0))
        else:
            self.pos_embed = None
        self.rope = rope
        self.blocks = nn.ModuleList([DiTBlock(width, num_heads, mlp_ratio, cond_dim=d, norm=norm, mlp=backbone.mlp_kind,
                                              rope=rope, backend=backbone.backend)
                                     for _ in range(depth)])
        for blk in self.blocks:
            for lin in blk.modules():  # every Linear: xavier-uniform weight, zero bias
                if isinstance(lin, nn.Linear):
                    nn.init.xavier_uniform_(lin.weight)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
            # adaLN-Zero: shifts, scales and gates start at 0, so every decoder block is the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        self.final = AdaLNLinear(width, p * p * backbone.out_channels, d, norm, backbone.backend)
        # the full grid's (row, column) positions (N, 2), for the blocks' rotary q/k
        self.register_buffer("token_pos", backbone.token_pos.clone(), persistent=False)

    def forward(self, h: torch.Tensor, c: torch.Tensor, keep_idx: torch.Tensor | TokenPack | None) -> torch.Tensor:
        """h (B, K, D) encoder tokens at keep_idx (or (B, N, D) with keep_idx None, or packed (T, D)
        with keep_idx a TokenPack), c (B, D) -> (B, N, p*p*C_out) predictions for every patch."""
        if isinstance(keep_idx, TokenPack):
            x = self.bridge(h, c, keep_idx)  # (T, D_dec)
            full = self.mask_token.to(x.dtype).expand(c.shape[0], self.num_tokens, -1).contiguous()
            x = keep_idx.scatter(full, x)  # (B, N, D_dec)
            keep_idx = None
        else:
            x = self.bridge(h, c)  # (B, K, D_dec)
        if keep_idx is not None:
            full = self.mask_token.to(x.dtype).expand(x.shape[0], self.num_tokens, -1).contiguous()
            x = ops.route_scatter(full, x, keep_idx, check_idx=False)  # (B, N, D_dec); drawn here, valid
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        pos = self.token_pos if self.rope else None
        for blk in self.blocks:
            x = blk(x, c, pos=pos)
        return self.final(x, c)


def condition(backbone, t: torch.Tensor, y, force_drop_ids=None) -> torch.Tensor:
    """The backbone's c (B, D) for (t, y), with exactly the label dropout the encoder used."""
    t = torch.as_tensor(t, device=backbone.token_pos.device)
    b = force_drop_ids.shape[0] if force_drop_ids is not None else (y.shape[0] if y is not None else t.numel())
    t = t.expand(b) if t.dim() == 0 else t
    if y is None:
        y = torch.full((b,), backbone.num_classes, dtype=torch.long, device=t.device)
    return backbone.t_embedder(t) + backbone.y_embedder(y, False, force_drop_ids)


def generate(model, backbone, decoder, x_t, t, y, keep_idx=None, force_drop_ids=None, return_hidden=()):
    """Encoder on the kept tokens (all of them with keep_idx None), decoder on all N.

    model runs the blocks (the backbone or its compiled form); backbone gives the embedders for c.
    -> (tokens (B, N, p*p*C_out), hidden {d: (B, K, D)} for the depths asked and the last).
    """
    depth = backbone.depth
    want = tuple(sorted(set(return_hidden) | {depth}))
    _, hidden = model(x_t, t, y, keep_idx=keep_idx, stop_at=depth, return_hidden=want, force_drop_ids=force_drop_ids)
    c = condition(backbone, t, y, force_drop_ids)
    return decoder(hidden[depth], c, keep_idx), hidden


def patch_normalize(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(..., P) patches -> (p - mean) / sqrt(var + eps) over each patch's P values, var the unbiased
    sample variance (divisor P - 1, torch.var's default, as the release's MAE target)."""
    mean = p.mean(-1, keepdim=True)
    var = p.var(-1, keepdim=True)
    return (p - mean) / (var + eps).sqrt()


@dataclass
class MaskDiTOptions:
    mask_ratio: float = opt(0.5, 'fraction of tokens masked per sample (maskdit); 0 = the unmasked fine-tune stage')
    mask_ratio_range: str | None = opt(None, "per-sample budgets: each sample's mask ratio drawn uniformly in [A, B] (0"
                                             ' <= A <= B < 1) instead of --mask-ratio, kept tokens packed without '
                                             'padding', type=str, metavar="A:B")
    mae_weight: float = opt(0.1, 'weight of the MAE term on masked tokens')
    decoder_depth: int | None = opt(None, 'decoder blocks; default 8 (the paper) for widths >= 384, else 2 (tiny '
                                          "models: a third of depth 6, about the paper's 8/28)", type=int)
    decoder_width: int | None = opt(None, 'decoder width; default 512 (the paper) for widths >= 384, else the '
                                          "backbone's", type=int)


@register_method("maskdit")
class MaskDiT(Method):
    """Masked encoder, full-sequence decoder, flow loss on kept tokens + MAE on masked ones."""

    token_plan = ("keep_idx",)
    owns_objective = True
    generator_modules = ("decoder",)
    find_unused_parameters = True  # the backbone's final layer: the decoder has its own

    @staticmethod
    def add_args(group) -> None:
        add_options(group, MaskDiTOptions)

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        if model is None:
            raise ConfigError("maskdit needs the backbone to size its decoder")
        o = read_options(MaskDiTOptions, args)
        self.ratio = float(o.mask_ratio)
        self.mae_weight = float(o.mae_weight)
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"--mask-ratio must lie in [0, 1), got {self.ratio}")
        if self.mae_weight < 0:
            raise ConfigError(f"--mae-weight must be >= 0, got {self.mae_weight}")
        paper = model.hidden_size >= PAPER_DECODER_FROM_WIDTH
        depth = o.decoder_depth or (8 if paper else 2)
        width = o.decoder_width or (512 if paper else model.hidden_size)
        heads = 16 if paper and width % 16 == 0 else model.num_heads
        if depth < 1 or width < 1:
            raise ConfigError(f"--decoder-depth and --decoder-width must be >= 1, got {depth}, {width}")
        self.backbone = model
        self.decoder = MaskDecoder(model, width, depth, heads)
        self.keep = int(model.num_patches * (1 - self.ratio))
        if self.keep < 1:
            raise ConfigError(f"--mask-ratio {self.ratio} keeps no token of {model.num_patches}")
        self.ratio_range = parse_ratio_range("--mask-ratio-range", o.mask_ratio_range)
        if self.ratio_range is not None and self.keep_count(self.ratio_range[1]) < 1:
            raise ConfigError(f"--mask-ratio-range: ratio {self.ratio_range[1]} keeps no token of {model.num_patches}")

    @property
    def packs_keep_idx(self) -> bool:
        """True when keep_idx is a TokenPack (per-sample counts), which Composite checks."""
        return self.ratio_range is not None

    def keep_count(self, ratio: float) -> int:
        """K = int(N (1 - ratio)), the paper's exact count."""
        return int(self.backbone.num_patches * (1 - ratio))

    def modules(self):
        return {"decoder": self.decoder}

    def forward_options(self, model, batch, step):
        x, g = batch["x"], batch.get("generator")
        if self.ratio_range is not None:
            counts = [self.keep_count(r) for r in draw_ratios(x.shape[0], *self.ratio_range, generator=g)]
            return {"keep_idx": TokenPack.draw(counts, self.backbone.num_patches, generator=g, device=x.device)}
        if self.ratio == 0:
            return {}
        return {"keep_idx": ops.draw_route(x.shape[0], self.backbone.num_patches, self.keep, generator=g,
                                           device=x.device)}

    def objective(self, model, batch, step, options):
        x, y = batch["x"], batch["y"]
        b = x.shape[0]
        t = batch.get("t")
        t = self.flow.sample_t(b, x.device, batch.get("generator")) if t is None else t
        noise = batch.get("noise")
        noise = self.flow.sample_noise(x, batch.get("generator")) if noise is None else noise
        x_t, target = interpolate(x, noise, t), velocity_target(x, noise)
        keep_idx = options.get("keep_idx")
        drop = options.get("force_drop_ids")  # another method (SRA) may have drawn the dropout
        drop = draw_label_dropout(self.backbone, batch) if drop is None else drop  # encoder = decoder labels
        tokens, hidden = generate(model, self.backbone, self.decoder, x_t, t, y, keep_idx, drop,
                                  options.get("return_hidden", ()))  # (B, N, p*p*C_out)
        bb = self.backbone
        pred = bb.patchify(mean_prediction(bb.unpatchify(tokens), x)).float()  # (B, N, p*p*C)
        tgt = bb.patchify(target).float()
        err = (pred - tgt).pow(2).mean(-1)  # (B, N) per-token MSE
        if keep_idx is None:
            flow = err.mean(1)
            res = {"loss": flow.mean(), "loss_per_sample": flow.detach()}
        elif isinstance(keep_idx, TokenPack):
            # Per-sample means over each sample's own kept / masked tokens, then the batch mean: the
            # fixed-count weighting, with a count per sample. Masked sums by a 0/1 mask, not a gather.
            kept = keep_idx.mask()  # (B, N)
            n_kept = kept.sum(1)
            flow = (err * kept).sum(1) / n_kept
            mae_err = (pred - patch_normalize(bb.patchify(x_t).float())).pow(2).mean(-1)
            mae = (mae_err * (1 - kept)).sum(1) / (bb.num_patches - n_kept).clamp(min=1)
            res = {"loss": flow.mean() + self.mae_weight * mae.mean(), "loss_flow": flow.mean().detach(),
                   "loss_mae": mae.mean().detach(), "loss_per_sample": flow.detach()}
        else:
            flow = ops.route_gather(err.unsqueeze(-1), keep_idx, check_idx=False)[..., 0].mean(1)  # kept tokens
            masked = ops.complement(keep_idx, bb.num_patches)
            mae_tgt = patch_normalize(bb.patchify(x_t).float())
            mae = ops.route_gather((pred - mae_tgt).pow(2).mean(-1, keepdim=True), masked, check_idx=False)
            mae = mae[..., 0].mean(1)
            res = {"loss": flow.mean() + self.mae_weight * mae.mean(), "loss_flow": flow.mean().detach(),
                   "loss_mae": mae.mean().detach(), "loss_per_sample": flow.detach()}
        res.update(t=t, noise=noise, x_t=x_t, target=target, pred=bb.unpatchify(pred.to(x.dtype)), hidden=hidden)
        return res

    @torch.no_grad()
    def sample(self, models, y, noise, **opts):
        return sample(MaskDiTGenerator(models["backbone"], models["decoder"]), y, noise=noise, **opts)


class MaskDiTGenerator(nn.Module):
    """The sampled network: the encoder on all tokens, then the decoder: -> (B, C_out, H, W)."""

    def __init__(self, backbone, decoder):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.num_classes = backbone.num_classes

    def forward(self, x, t, y, **kw):
        if kw:
            raise TypeError(f"the MaskDiT generator takes no forward options, got {sorted(kw)}")
        tokens, _ = generate(self.backbone, self.backbone, self.decoder, x, t, y)
        return self.backbone.unpatchify(tokens)
