"""Sample quality: Frechet distance in a feature space, and class accuracy of conditional samples.

The default feature network is a small CNN classifier that the library trains once on the data set's
training split and caches on disk, keyed by the data's fingerprint (sha256 of pixels and labels), so
FD numbers of different runs on the same data are comparable. Its held-out accuracy is reported with
it (>= 95% on digits, tested). An Inception/DINOv2-style network can be given instead as a local file:
a torch.export archive (.pt2) or a TorchScript file, loaded without unpickling arbitrary code.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import cache_dir, load_or_fit
from .files import check_file, load_torchscript
from .frechet import frechet_distance, gaussian_stats

_CLASSIFIER_VERSION = "v4"  # bump when the architecture or training recipe changes: invalidates caches


# -----------------------------------------------------------------------------------------------
# Frechet distance
# -----------------------------------------------------------------------------------------------


# -----------------------------------------------------------------------------------------------
# The default feature network: a small classifier
# -----------------------------------------------------------------------------------------------


class FeatureClassifier(nn.Module):
    """conv16-conv32-pool-conv32-pool(4x4)-fc(feat_dim)-fc(classes); features() is the fc(feat_dim) output."""

    def __init__(self, in_channels: int, num_classes: int, feat_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(32 * 16, feat_dim)
        self.head = nn.Linear(feat_dim, num_classes)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "feat_dim": feat_dim}

    def features(self, x):  # (B, C, H, W) -> (B, feat_dim)
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def predict(net, images: torch.Tensor, batch_size: int = 512, fn: str = "forward") -> torch.Tensor:
    """Run net (or net.features) over images in batches, on net's device, returning CPU float32."""
    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    f = getattr(net, fn)
    out = torch.cat([f(images[i:i + batch_size].to(dev).float()).float().cpu()
                     for i in range(0, len(images), batch_size)])
    net.train(was)
    return out


def train_classifier(ds, *, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     holdout: float = 0.2, verbose: bool = False):
    """Train a FeatureClassifier on ds's training split; returns (net, held-out accuracy). All its
    randomness comes from `seed` (the global RNG forked and seeded): the net does not depend on the
    caller's RNG state, and the caller's stream is the same whether it trained or loaded a cache."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _train_classifier(ds, epochs, batch_size, lr, seed, holdout, verbose)


def _train_classifier(ds, epochs, batch_size, lr, seed, holdout, verbose):
    tr, ho = ds.split(holdout, seed)
    g = torch.Generator().manual_seed(seed)
    net = FeatureClassifier(ds.channels, ds.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    x_tr, y_tr = ds.x[tr], ds.y[tr]
    with torch.enable_grad():  # callers often evaluate under no_grad
        _fit(net, opt, sched, x_tr, y_tr, g, epochs, batch_size, verbose)
    acc = (predict(net, ds.x[ho]).argmax(1) == ds.y[ho]).float().mean().item()
    return net.eval(), acc


def _fit(net, opt, sched, x_tr, y_tr, g, epochs, batch_size, verbose):
    net.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            xb = x_tr[idx]
            # one-pixel random shifts: cheap augmentation that buys a few points of held-out accuracy
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"classifier epoch {ep + 1}/{epochs} loss {loss.item():.4f}")


def get_classifier(ds, *, cache: str | None = None, retrain: bool = False, verbose: bool = False):
    """The cached classifier for ds (trained and cached on first use); returns (net, held-out accuracy)."""
    path = os.path.join(cache or cache_dir(), "feature_classifier", f"{ds.fingerprint()}-{_CLASSIFIER_VERSION}.pt")

    def fit():
        net, acc = train_classifier(ds, verbose=verbose)
        return net, {"accuracy": acc}

    net, info, _ = load_or_fit(path, FeatureClassifier, fit, retrain=retrain, what="feature classifier cache")
    return net.eval(), float(info["accuracy"])


# -----------------------------------------------------------------------------------------------
# External feature networks (Inception / DINOv2 style) from a local file
# -----------------------------------------------------------------------------------------------


class FeatureNet(nn.Module):
    """Wrap a loaded module: repeat grey to `channels`, resize to `input_size`, flatten its output."""

    def __init__(self, module: nn.Module, input_size: int | None = None, channels: int | None = None):
        super().__init__()
        self.module, self.input_size, self.channels = module, input_size, channels
        self._p = nn.Parameter(torch.zeros(0), requires_grad=False)  # gives predict() a device to read

    def train(self, mode: bool = True):
        # a loaded feature net is frozen, and an exported program refuses train()/eval() calls
        self.training = mode
        return self

    def features(self, x):
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"FeatureNet: cannot map {x.shape[1]} channels to {self.channels}")
            x = x.expand(-1, self.channels, -1, -1)
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1)

    forward = features


def load_feature_net(path: str, input_size: int | None = None, channels: int | None = None) -> FeatureNet:
    """A feature network from a local .pt2 (torch.export.save, exported with a dynamic batch dimension)
    or TorchScript (torch.jit.save) file. Neither format unpickles arbitrary Python objects."""
    check_file(path, "feature network file")
    try:
        module = torch.export.load(path).module() if path.endswith(".pt2") else load_torchscript(path)
    except Exception as e:
        raise ValueError(f"feature network file {path!r} is neither a torch.export (.pt2) nor a TorchScript "
                         f"archive ({type(e).__name__}: {str(e)[:200]})") from e
    return FeatureNet(module, input_size, channels)


# -----------------------------------------------------------------------------------------------
# The evaluator the trainer uses
# -----------------------------------------------------------------------------------------------


class Evaluator:
    """FD of samples against the whole data set, and class accuracy, in one feature network's space."""

    def __init__(self, ds, feature_net: nn.Module | None = None, cache: str | None = None, verbose: bool = False):
        self.classifier, self.classifier_accuracy = get_classifier(ds, cache=cache, verbose=verbose)
        self.feature_net = feature_net if feature_net is not None else self.classifier
        self.ref_stats = gaussian_stats(predict(self.feature_net, ds.x, fn="features"))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        feats = predict(self.feature_net, images, fn="features")
        res = {"fd": frechet_distance(*gaussian_stats(feats), *self.ref_stats)}
        if labels is not None:
            res["acc"] = class_accuracy(self.classifier, images, labels)
        return res


def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of class-conditional samples that the classifier assigns to the class they were drawn for."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"class_accuracy: {images.shape[0]} images but {labels.shape[0]} labels")
    return (predict(classifier, images).argmax(1) == labels.cpu()).float().mean().item()
