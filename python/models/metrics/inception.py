"""The standard ImageNet metrics: FID, sFID, Inception Score, precision/recall in Inception-v3 features.

    python -m effkernels.models.metrics.inception --weights pt_inception-2015-12-05-6726825d.pth \\
        --ref VIRTUAL_imagenet256_labeled.npz --samples samples_images.npz

The network is the FID variant of Inception-v3 (the 2015-12-05 TensorFlow graph that every FID number
is measured with), built from torchvision's Inception3 with the four blocks in which that graph differs
from torchvision's model (pytorch-fid's port and torch-fidelity agree on them): Mixed_5b..5d,
Mixed_6b..6e and Mixed_7b average-pool without counting the padding, Mixed_7c max-pools in its pool
branch, and the classifier has 1008 outputs. Parameter names are torchvision's, so the weights file is
a plain state dict: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` and torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (the same tensors) load as they are. No pip package ships
these weights inside its wheel (pytorch-fid 0.3.0, torch-fidelity 0.4.0 and clean-fid 0.1.35 all
download them on first use), so the file is always given; nothing is downloaded here.
A TorchScript file works too: one traced from FIDInceptionV3 (all metrics), or NVlabs'
`inception-2015-12-05.pt` (called as net(images_0_255, return_features=True): pool features only, so
FID and precision/recall).

Features, as the ADM suite (openai/guided-diffusion evaluations/evaluator.py) defines them:
  pool      pool_3, (N, 2048): FID, precision/recall
  spatial   mixed_6/conv = Mixed_6d.branch1x1 (conv-BN-ReLU), its first 7 channels, flattened in the
            TF graph's (H, W, C) order: (N, 7 x 17 x 17 = 2023) at 299 px: sFID
  logits    pool_3 @ fc.weight^T without the bias (the graph's softmax input), (N, 1008): IS
Images are resized to 299 x 299 (bilinear, as pytorch-fid); the TF graph resizes inside itself, so
numbers agree with ADM's evaluator to about the first decimal, not bit for bit.
Reference statistics: the ADM reference batches (VIRTUAL_imagenet256_labeled.npz: mu, sigma, mu_s,
sigma_s, and arr_0, 10K uint8 images that precision/recall needs) or any .npz with mu/sigma.

This is for images (decoded samples). The trainer's default for the embedded data stays the small-CNN
Frechet distance of effkernels.models.metrics.classifier (named "fd": a data-trained classifier's features, not FID).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .files import check_file, load_torchscript
from .frechet import frechet_distance, gaussian_stats

SPATIAL_CHANNELS = 7  # ADM's sFID keeps the first 7 channels of mixed_6/conv


# -----------------------------------------------------------------------------------------------
# The FID Inception-v3
# -----------------------------------------------------------------------------------------------


def _blocks():
    from torchvision.models import inception as tv

    class FIDInceptionA(tv.InceptionA):
        """Mixed_5b..5d: the pool branch averages over the valid (unpadded) pixels only."""

        def _forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return [b1, b5, b3, bp]

    class FIDInceptionC(tv.InceptionC):
        """Mixed_6b..6e: the same pooling rule."""

        def _forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = self.branch7x7dbl_1(x)
            for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                d = m(d)
            bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return [b1, b7, d, bp]

    class FIDInceptionE(tv.InceptionE):
        """Mixed_7b (max_pool False: average without padding) and Mixed_7c (max_pool True: the TF graph
        max-pools there, a quirk every FID implementation keeps)."""

        def __init__(self, in_channels, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            b1 = self.branch1x1(x)
            t = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            p = (F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool
                 else F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
            return [b1, b3, bd, self.branch_pool(p)]

    return tv, FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1] (N, 3, H, W) -> dict(pool, spatial, logits); torchvision parameter names."""

    def __init__(self, resize: int = 299):
        super().__init__()
        tv, A, C, E = _blocks()
        net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
            setattr(net, name, A(cin, pool_features=pf))
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            setattr(net, name, C(768, channels_7x7=c7))
        net.Mixed_7b, net.Mixed_7c = E(1280, max_pool=False), E(2048, max_pool=True)
        del net.dropout
        self.net, self.resize = net, int(resize)

    def load_state_dict(self, sd, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(sd, strict=strict, assign=assign)

    def state_dict(self, *a, **k):
        return self.net.state_dict(*a, **k)

    def forward(self, x: torch.Tensor) -> dict:
        n = self.net
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        for m in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                  n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c):
            x = m(x)
        s = n.Mixed_6d.branch1x1(x)  # mixed_6/conv
        spatial = s[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # the TF graph's NHWC order
        for m in (n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = m(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ n.fc.weight.T}


class _NVlabsScript(nn.Module):
    """NVlabs' TorchScript detector: 0..255 images in, pool features out (return_features=True)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return {"pool": self.module((x + 1) * 127.5, return_features=True)}


def load_inception(path: str, resize: int = 299) -> nn.Module:
    """The FID Inception from a local state dict (.pth/.pt in torchvision/pytorch-fid naming) or a
    TorchScript archive. Never downloads. Keys that do not fit are an error naming them."""
    check_file(path, "Inception weights file", " (nothing is downloaded: get pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth and give its path)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling failure: try the file as TorchScript below
        sd = None
    if isinstance(sd, dict):
        for k in ("state_dict", "model"):
            if isinstance(sd.get(k), dict):
                sd = sd[k]
        net = FIDInceptionV3(resize)
        have = set(net.state_dict())
        # files saved before BatchNorm counted its batches lack num_batches_tracked (BN fills it in)
        missing = sorted(k for k in have - set(sd) if not k.endswith("num_batches_tracked"))
        unexpected = sorted(set(sd) - have)
        if missing or unexpected:
            raise ValueError(f"Inception weights file {path!r} is not in the pytorch-fid / torchvision layout: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"Inception weights file {path!r}: {str(e)[:400]}") from e
        return net.eval().requires_grad_(False)
    try:
        m = load_torchscript(path)
    except Exception as e:
        raise ValueError(f"Inception file {path!r} is neither a state dict nor a TorchScript archive "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
    args = [a.name for a in m.forward.schema.arguments] if hasattr(m.forward, "schema") else []
    return (_NVlabsScript(m) if "return_features" in args else m).eval()


# -----------------------------------------------------------------------------------------------
# Features and metrics
# -----------------------------------------------------------------------------------------------


def as_float_images(images) -> torch.Tensor:
    """uint8 NHWC (ADM's arr_0, effkernels-sample --vae's npz) or float NCHW in [-1, 1] -> float NCHW in [-1, 1]."""
    t = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if t.dim() != 4:
        raise ValueError(f"images must be (N, H, W, 3) uint8 or (N, C, H, W) float, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
            t = t.permute(0, 3, 1, 2)
        t = t.float() / 127.5 - 1
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if t.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {t.shape[1]}")
    return t.float()


@torch.no_grad()
def inception_features(net: nn.Module, images, batch_size: int = 100, device=None) -> dict[str, np.ndarray]:
    """Run the network over images (see as_float_images) in batches: {pool, spatial, logits} as float64."""
    x = as_float_images(images)
    dev = device or next((p.device for p in net.parameters()), torch.device("cpu"))
    out: dict[str, list] = {}
    for i in range(0, len(x), batch_size):
        r = net(x[i:i + batch_size].to(dev))
        r = r if isinstance(r, dict) else {"pool": r}
        for k, v in r.items():
            out.setdefault(k, []).append(v.double().flatten(1).cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def fid_from_features(feats: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Frechet distance of the features' Gaussian to (mu, sigma). With fewer samples than dimensions the
    cross term is computed in sample space: for S = A^T A (A the centred features / sqrt(n - 1)), the
    nonzero eigenvalues of S sigma are those of the n x n matrix A sigma A^T, so tr (S^1/2 sigma S^1/2)^1/2
    needs an n x n eigendecomposition instead of two d x d ones (exact, not an approximation)."""
    f = np.asarray(feats, np.float64)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"fid_from_features: need at least 2 samples, got {n}")
    if n - 1 >= d:
        return frechet_distance(*gaussian_stats(f), mu, sigma)
    mu, sigma = np.asarray(mu, np.float64), np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(f"fid_from_features: {d}-dim features but reference mu {mu.shape}, sigma {sigma.shape}")
    m = f.mean(0)
    a = (f - m) / np.sqrt(n - 1)
    k = a @ sigma @ a.T
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((k + k.T) / 2), 0, None)).sum()
    return float(((m - mu) ** 2).sum() + (a * a).sum() + np.trace(sigma) - 2 * tr_cross)


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over splits of split_size samples (ADM's 5000)."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = (part * (np.log(part + 1e-30) - np.log(part.mean(0, keepdims=True) + 1e-30))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _kth_radii(f: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of f to its k-th nearest neighbour in f (itself excluded)."""
    r = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)
        r.append(d.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest: the 0 to itself comes first
    return torch.cat(r)


def _inside(a: torch.Tensor, b: torch.Tensor, radii_b: torch.Tensor, chunk: int) -> torch.Tensor:
    """Whether each row of a lies within radii_b of some row of b."""
    out = []
    for i in range(0, len(a), chunk):
        out.append((torch.cdist(a[i:i + chunk], b) <= radii_b[None]).any(1))
    return torch.cat(out)


def precision_recall(ref: np.ndarray, gen: np.ndarray, k: int = 3, chunk: int = 1000) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019, ADM's k = 3): precision = share of generated
    features inside the union of the reference features' k-NN balls; recall the other way round."""
    r, g = torch.as_tensor(ref, dtype=torch.float64), torch.as_tensor(gen, dtype=torch.float64)
    if min(len(r), len(g)) <= k:
        raise ValueError(f"precision_recall: need more than k = {k} samples in each set, got {len(r)} and {len(g)}")
    prec = _inside(g, r, _kth_radii(r, k, chunk), chunk).double().mean().item()
    rec = _inside(r, g, _kth_radii(g, k, chunk), chunk).double().mean().item()
    return prec, rec


def load_reference(path: str) -> dict:
    """A reference .npz: mu, sigma (pool), optional mu_s, sigma_s (spatial) and arr_0 (images, for
    precision/recall), as the ADM suite's VIRTUAL_*.npz; arrays are read only when present."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics file {path!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"reference file {path!r} has no mu/sigma arrays (found {', '.join(z.files)})")
        return {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "arr_0") if k in z.files}


def evaluate_images(net: nn.Module, images, ref: dict, *, batch_size: int = 100) -> dict:
    """FID, sFID, IS, precision and recall of `images` against `ref` (load_reference's dict), as far as the
    network's features and the reference's arrays allow; the metrics left out are not in the result."""
    f = inception_features(net, images, batch_size)
    res = {"fid": fid_from_features(f["pool"], ref["mu"], ref["sigma"])}
    if "spatial" in f and "mu_s" in ref:
        res["sfid"] = fid_from_features(f["spatial"], ref["mu_s"], ref["sigma_s"])
    if "logits" in f:
        res["inception_score"] = inception_score(f["logits"])
    if "arr_0" in ref:
        rf = inception_features(net, ref["arr_0"], batch_size)["pool"]
        res["precision"], res["recall"] = precision_recall(rf, f["pool"])
    return res


def reference_stats(net: nn.Module, images, *, batch_size: int = 100) -> dict:
    """mu, sigma, mu_s, sigma_s of a set of images: a reference file of one's own (np.savez(path, **stats))."""
    f = inception_features(net, images, batch_size)
    out = dict(zip(("mu", "sigma"), gaussian_stats(f["pool"])))
    if "spatial" in f:
        out.update(zip(("mu_s", "sigma_s"), gaussian_stats(f["spatial"])))
    return out


# -----------------------------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------------------------


def _read_images(path: str):
    with np.load(path, allow_pickle=False) as z:
        for k in ("arr_0", "images"):
            if k in z.files:
                return z[k]
    raise ValueError(f"samples file {path!r} has neither arr_0 (uint8 NHWC) nor images (float NCHW in [-1, 1])")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m effkernels.models.metrics.inception", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="local FID Inception weights (state dict or TorchScript)")
    p.add_argument("--ref", required=True, help="reference .npz (mu, sigma[, mu_s, sigma_s, arr_0])")
    p.add_argument("--samples", required=True, help=".npz with arr_0 (uint8 NHWC) or images (float NCHW, [-1, 1])")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--resize", type=int, default=299,
                   help="input size of the network (299: the standard one; other sizes compare with nothing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    try:
        net = load_inception(a.weights, resize=a.resize).to(a.device)
        res = evaluate_images(net, _read_images(a.samples), load_reference(a.ref), batch_size=a.batch_size)
    except (OSError, ValueError) as e:
        print(f"inception: error: {e}", file=sys.stderr)
        return 2
    for k, v in res.items():
        print(f"{k}: {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
