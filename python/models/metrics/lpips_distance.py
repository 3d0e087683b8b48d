"""LPIPS (VGG16) as a per-sample distance for consistency training (CT/ACT's `--ct-distance lpips`).

Built from the `lpips` package (`pip install effkernels[lpips]`) with nothing downloaded: its
calibrated 1x1 heads (`weights/v0.1/vgg.pth`) ship inside the package's wheel and are read from
there, and its input scaling and channel normalisation are used as they are. The VGG16 trunk is the
convolutional part of torchvision's VGG16 (configuration "D", layer indices as torchvision's
`features.N`), filled from a LOCAL file the user gives in torchvision's official key layout
(`features.0.weight`, ... as torchvision's `vgg16-397923af.pth` holds them; `classifier.*` keys may be
present and are ignored). `lpips.LPIPS(...)` itself is not constructed: its trunk loader fetches
ImageNet weights unless told not to, and even with `pnet_rand=True` it builds torchvision's whole
VGG16, whose 102M-parameter classifier LPIPS never uses (36 s to initialise on this busy machine).

Inputs are images in [-1, 1]: 1-channel images are repeated to 3 channels; the target is clipped
to [-1, 1] and both are resized bilinearly to `size` x `size` before the network, as ACT's release
does (size 224). Why resize at all: VGG16 pools four times before its fifth LPIPS layer, so an 8x8
digit would have no spatial extent left there (8 -> 4 -> 2 -> 1 -> 0); the smallest size that keeps
every layer at >= 2x2 is 32. ACT's 224 is ImageNet's scale, near which the heads were calibrated; on
a CPU it costs about 15 GFLOP per image and pass, so the digits runs here use --lpips-size 32.

An ImageNet-trained feature distance can flatter an ImageNet-feature FID (the generator is trained
to match what the metric's features see); on digits our metric's features are the library's own
digits classifier, which LPIPS does not share.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# VGG16 ("D"): conv widths, "M" a 2x2 max-pool; each conv is followed by a ReLU, so the indices of
# nn.Sequential match torchvision's `features.N`. LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3,
# relu5_3: the outputs of features[:4], [4:9], [9:16], [16:23], [23:30].
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_TAPS = (4, 9, 16, 23, 30)


def vgg16_trunk() -> nn.Sequential:
    """torchvision's VGG16 `features` up to relu5_3 (the last pool is not used by LPIPS), random."""
    layers, c = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers[:_TAPS[-1]])


def _import_lpips():
    try:
        import lpips
    except ImportError as e:  # pragma: no cover - the extra is installed in the test venv
        raise ImportError("--ct-distance lpips needs the `lpips` extra: pip install 'effkernels[lpips]'") from e
    return lpips


def load_vgg16_features(path) -> dict:
    """The trunk's tensors (keys `N.weight`/`N.bias`) from an official-layout torchvision VGG16 state
    dict at `path`: a missing file, a missing key or a mismatched shape is a ValueError naming it."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"--lpips-vgg: no VGG16 weights file at {path!r} (give a local torchvision vgg16 "
                         "state dict; nothing is downloaded)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same clear message
        raise ValueError(f"--lpips-vgg: cannot read {str(path)!r} as a torch state dict: {e}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):  # a bad file, like the others: ValueError
        raise ValueError(  # noqa: TRY004
            f"--lpips-vgg: {str(path)!r} holds a {type(sd).__name__}, not a state dict")
    want = {k: tuple(v.shape) for k, v in vgg16_trunk().state_dict().items()}
    have = {k[len("features."):]: v for k, v in sd.items() if isinstance(k, str) and k.startswith("features.")}
    missing = [k for k in want if k not in have]
    if missing:
        raise ValueError(f"--lpips-vgg: {str(path)!r} is not an official-layout torchvision VGG16 state dict: "
                         f"missing {['features.' + k for k in missing[:4]]}{' ...' if len(missing) > 4 else ''}")
    for k, shape in want.items():
        if not torch.is_tensor(have[k]) or tuple(have[k].shape) != shape:
            got = tuple(have[k].shape) if torch.is_tensor(have[k]) else type(have[k]).__name__
            raise ValueError(f"--lpips-vgg: {str(path)!r}: features.{k} has shape {got}, VGG16 needs {shape}")
    return {k: have[k].float() for k in want}


class LPIPSDistance(nn.Module):
    """Per-sample LPIPS(VGG16, v0.1) between two image batches in [-1, 1]; frozen, always in eval
    mode, gradients flow to the inputs only."""

    def __init__(self, vgg_path, size: int = 224):
        super().__init__()
        if not isinstance(size, int) or isinstance(size, bool) or size < 32:
            raise ValueError(f"--lpips-size must be an int >= 32 (VGG16 pools 4 times before LPIPS's last "
                             f"layer), got {size!r}")
        lpips = _import_lpips()
        trunk = vgg16_trunk()
        trunk.load_state_dict(load_vgg16_features(vgg_path), strict=True)  # first: a bad file fails early
        heads_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)  # shipped in the wheel
        self.trunk = trunk
        # use_dropout=True only so the module layout matches the file's keys (model.1.weight)
        self.lins = nn.ModuleList(lpips.NetLinLayer(c, use_dropout=True) for c in (64, 128, 256, 512, 512))
        self.lins.load_state_dict({f"{i}.model.1.weight": heads[f"lin{i}.model.1.weight"] for i in range(5)})
        self.scaling = lpips.ScalingLayer()
        self.normalize = lpips.normalize_tensor
        self.requires_grad_(False)
        self.size = size
        super().train(False)

    def train(self, mode: bool = True):  # always eval: the heads' dropout is for training LPIPS itself
        return super().train(False)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        h, out, lo = self.scaling(x), [], 0
        for hi in _TAPS:
            for layer in self.trunk[lo:hi]:
                h = layer(h)
            out.append(self.normalize(h))
            lo = hi
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) distances; the target is clipped to [-1, 1] (as ACT's release)."""
        if pred.shape != target.shape:
            raise ValueError(f"LPIPS: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        fa, fb = self._features(pred), self._features(target.clamp(-1, 1))
        return sum(lin((a - b) ** 2).mean((1, 2, 3)) for lin, a, b in zip(self.lins, fa, fb))
