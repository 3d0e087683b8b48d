"""The methods package and the trainer's hooks, each exercised by a toy method written here:
registry and entry points, composition, generator EMA and method-owned sampling, an aux optimizer,
batch extras, checkpoint rules, stale temp files, fused AdamW, data parallel with an unused module,
a non-finite loss on one rank, learned-sigma outputs, and the wheel's contents."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.train.trainer import Trainer, make_optimizer
from effkernels.models.backbone.network import Route
from effkernels.models.backbone.configs import build
from effkernels.models.checkpoint import load_checkpoint, save_checkpoint
from effkernels.models.train.rebuild import generator_from_checkpoint
from effkernels.models.data.sources import ArrayDataset, DataError, load_latents
from effkernels.models.methods import METHODS, AuxModule, ConfigError, Method, build_method, register_method
from effkernels.models.objectives.flow import FlowMatching
from effkernels.models.objectives.prediction import mean_prediction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = '{"depth": 2, "hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0.0}'


# -----------------------------------------------------------------------------------------------
# Toy methods
# -----------------------------------------------------------------------------------------------

class ToyAlign(Method):
    """An extra loss on the hidden state at depth 1 through a head of its own."""

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        self.head = nn.Linear(32, 8)

    def modules(self):
        return {"head": self.head}

    def forward_options(self, model, batch, step):
        return {"return_hidden": (1,)}

    def extra_losses(self, out, model, batch, step):
        return {"align": 0.1 * self.head(out["hidden"][1]).pow(2).mean()}


class ToyRoute(Method):
    """A token plan: route block 2 at ratio 0.5, drawn before the forward (16 tokens: 8x8, patch 2)."""
    token_plan = ("routes",)

    def forward_options(self, model, batch, step):
        return {"routes": [Route(2, 2, 0.5).draw(batch["x"].shape[0], 16, generator=batch["generator"])]}


class ToyKeep(Method):
    token_plan = ("keep_idx",)


class ToyObjective(Method):
    owns_objective = True


class ToyWholeLoss(Method):
    def loss(self, model, batch, step):
        return {"loss": model(batch["x"], torch.zeros(batch["x"].shape[0]), batch["y"]).pow(2).mean()}


class ToyUnused(Method):
    """Owns a module that never gets a gradient (as an ERW warm-up leaves the late blocks)."""
    find_unused_parameters = True

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        self.unused = nn.Linear(4, 4)

    def modules(self):
        return {"unused": self.unused}


class ToyDecoder(Method):
    """A generator module (like MaskDiT's decoder): EMA'd and used by the method's own sampler."""
    generator_modules = ("dec",)

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        self.dec = nn.Conv2d(1, 1, 1)
        self.sampled_with = None

    def modules(self):
        return {"dec": self.dec}

    def objective(self, model, batch, step, options):
        fm = self.flow
        return fm.loss(lambda x, t, y, **kw: self.dec(model(x, t, y, **kw)), batch["x"], batch["y"],
                       batch["generator"], t=batch.get("t"), noise=batch.get("noise"), **options)

    owns_objective = True

    @torch.no_grad()
    def sample(self, models, y, noise, **opts):
        self.sampled_with = models
        return models["dec"](models["backbone"](noise, torch.ones(noise.shape[0]), y)).clamp(-1, 1)


class ToyDisc(Method):
    """A discriminator with its own optimizer; the generator's loss runs it too."""

    def __init__(self, model=None, args=None):
        super().__init__(model, args)
        self.disc = nn.Linear(64, 1)
        self.counter = 0

    def aux_modules(self):
        return {"disc": AuxModule(self.disc, lr=1e-2)}

    def extra_losses(self, out, model, batch, step):
        return {"adv": 0.01 * self.disc(out["pred"].flatten(1)).mean()}

    def aux_loss(self, name, module, batch, step, out):
        self.counter += 1
        real, fake = module(batch["x"].flatten(1)), module(out["pred"].detach().flatten(1))
        return {"loss": torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()}

    def state_dict(self):
        return {"counter": torch.tensor(self.counter)}

    def load_state_dict(self, state):
        self.counter = int(state["counter"])


class ToyFeat(Method):
    batch_keys = ("feat",)
    seen = []

    def extra_losses(self, out, model, batch, step):
        ToyFeat.seen.append(batch["feat"].clone())
        return {}


class ToyNaN(Method):
    """A NaN loss on rank 1 only (on another rank a naive check would leave rank 0 in the all-reduce)."""

    def extra_losses(self, out, model, batch, step):
        bad = int(os.environ.get("RANK", "0")) == 1
        return {"poison": torch.tensor(float("nan") if bad else 0.0)}


TOYS = {"toy_align": ToyAlign, "toy_route": ToyRoute, "toy_keep": ToyKeep, "toy_obj": ToyObjective,
        "toy_whole": ToyWholeLoss, "toy_unused": ToyUnused, "toy_dec": ToyDecoder, "toy_disc": ToyDisc,
        "toy_feat": ToyFeat, "toy_nan": ToyNaN}


@pytest.fixture
def toys(monkeypatch):
    for k, v in TOYS.items():
        monkeypatch.setitem(METHODS, k, v)
    return TOYS


def _digits_like(seed, n=48, extras=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset(x, y, 10, "rand", extras=extras or {})


def _trainer(tmp_path, method, seed=0, ds=None, *extra):
    args = train_mod.parse_args(["--out", str(tmp_path), "--method", method, "--batch-size", "8", "--seed", str(seed),
                                 "--model-kwargs", SMALL, "--warmup", "0", "--eval-every", "0", "--quiet",
                                 "--eval-samples", "20", "--eval-steps", "2", *extra])
    return Trainer(args, ds if ds is not None else _digits_like(seed))


# -----------------------------------------------------------------------------------------------
# Registry and entry points
# -----------------------------------------------------------------------------------------------

def _methods_listed(cmd):
    r = subprocess.run(cmd + ["--list-methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_console_script_and_module_entry_points_list_the_same_methods():
    script = os.path.join(os.path.dirname(sys.executable), "effkernels-train")
    via_module = _methods_listed([sys.executable, "-m", "effkernels.models.train"])
    assert via_module == _methods_listed([script])
    from effkernels.models.methods import METHODS as registry
    assert set(via_module) >= {"sit"} and set(via_module) == set(registry) - set(TOYS)


def test_register_method_rejects_bad_names():
    for bad in ("", "a+b", 3):
        with pytest.raises(ValueError, match="register_method"):
            register_method(bad)


def test_factory_must_return_a_method(monkeypatch):
    monkeypatch.setitem(METHODS, "plain", lambda model, args: object())
    with pytest.raises(ConfigError, match="not a Method subclass"):
        build_method("plain")


def test_sample_does_not_import_the_trainer():
    code = ("import sys, effkernels.models.cli.sample; "
            "print([m for m in ('effkernels.models.train.trainer', 'effkernels.models.cli.train') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stderr


# -----------------------------------------------------------------------------------------------
# Composition
# -----------------------------------------------------------------------------------------------

class Spy(nn.Module):
    """Records the keyword options each forward receives."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y, **kw):
        self.calls.append(kw)
        return self.model(x, t, y, **kw)


def test_composition_merges_options_and_adds_terms(toys, seed):
    model = build("tiny/2", **{"depth": 2, "hidden_size": 32, "num_heads": 2})
    m = build_method("toy_route+toy_align", model)
    assert m.name == "toy_route+toy_align" and set(m.modules()) == {"head"} and m.token_plan == ("routes",)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (4,))
    batch = {"x": x, "y": y, "t": torch.rand(4), "noise": torch.randn(4, 1, 8, 8),
             "generator": torch.Generator().manual_seed(seed)}
    spy = Spy(model)
    out = m.loss(spy, batch, 0)
    (kw,) = spy.calls
    assert kw["return_hidden"] == (1,) and kw["routes"] == [Route(2, 2, 0.5)]
    # the same forward by hand: the flow loss of the routed model plus the head's term
    drawn = Route(2, 2, 0.5).draw(4, 16, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(kw["routes"][0].idx, drawn.idx)
    ref = FlowMatching().loss(model, x, y, t=batch["t"], noise=batch["noise"], return_hidden=(1,), routes=[drawn])
    align = 0.1 * m.modules()["head"](ref["hidden"][1]).pow(2).mean()
    torch.testing.assert_close(out["loss_base"], ref["loss"], rtol=0, atol=0)
    torch.testing.assert_close(out["align"], align, rtol=0, atol=0)
    torch.testing.assert_close(out["loss"], ref["loss"] + align, rtol=0, atol=0)


@pytest.mark.parametrize("spec,match", [
    ("toy_route+toy_keep", "TREAD and MaskDiT do not combine"),
    ("toy_obj+toy_dec", "both define the objective"),
    ("toy_whole+toy_align", "defines the whole loss itself"),
    ("toy_align+toy_align", "listed twice"),
    ("toy_align+nope", "'nope' is not registered"),
])
def test_composition_conflicts_are_config_errors(toys, spec, match):
    with pytest.raises(ConfigError, match=match):
        build_method(spec)


def test_undeclared_token_option_is_an_error(toys, monkeypatch):
    monkeypatch.setattr(ToyAlign, "forward_options", lambda self, m, b, s: {"keep_idx": None})
    with pytest.raises(ConfigError, match="token_plan"):
        build_method("toy_align").forward_options(None, {}, 0)


def test_composed_method_trains_through_the_cli(toys, tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--method", "toy_route+toy_align", "--model-kwargs", SMALL, "--steps", "3",
            "--batch-size", "8", "--eval-every", "0", "--quiet", "--log-every", "1"]
    assert train_mod.main(argv) == 0
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    assert ck["meta"]["method"] == "toy_route+toy_align" and any(k.startswith("head.") for k in ck["method"]["modules"])
    rows = MetricsLog.read(str(tmp_path / "metrics.jsonl"))
    assert all("align" in r and "loss_base" in r for r in rows)


# -----------------------------------------------------------------------------------------------
# Generator modules: EMA and the method's sampler
# -----------------------------------------------------------------------------------------------

def test_generator_module_is_averaged_and_sampled_with(toys, tmp_path, seed, monkeypatch):
    monkeypatch.setenv("EFFKERNELS_CACHE", str(tmp_path / "cache"))
    tr = _trainer(tmp_path, "toy_dec", seed)
    assert set(tr.ema.models) == {"backbone", "dec"}
    ema0 = {k: v.clone() for k, v in tr.ema.models["dec"].state_dict().items()}
    live0 = {k: v.clone() for k, v in tr.modules["dec"].state_dict().items()}
    tr.train_step(tr.make_batch(0))
    d = tr.ema.decay_at(1)
    for k, v in tr.ema.models["dec"].state_dict().items():
        expect = live0[k] * d + tr.modules["dec"].state_dict()[k] * (1 - d)
        torch.testing.assert_close(v, expect)
    # (the weight's input, a fresh adaLN-Zero backbone's output, is zero: only the bias moves yet)
    assert not torch.equal(tr.ema.models["dec"].bias, ema0["bias"])
    res = tr.evaluate()
    assert tr.method.parts[0][1].sampled_with is tr.ema.models and "fd" in res
    tr.save(str(tmp_path / "ck.pt"))
    method, models, _ = generator_from_checkpoint(load_checkpoint(str(tmp_path / "ck.pt")))
    for k, v in models["dec"].state_dict().items():
        assert torch.equal(v, tr.ema.models["dec"].state_dict()[k])


def test_sample_cli_uses_the_method(toys, tmp_path):
    assert train_mod.main(["--out", str(tmp_path / "r"), "--method", "toy_dec", "--model-kwargs", SMALL, "--steps", "1",
                           "--batch-size", "8", "--eval-every", "0", "--quiet"]) == 0
    from effkernels.models.cli import sample as sample_mod
    called = []
    orig = ToyDecoder.sample
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(ToyDecoder, "sample", lambda self, models, y, noise, **o: called.append(o) or orig(self, models, y, noise))
        assert sample_mod.main(["--ckpt", str(tmp_path / "r" / "last.pt"), "--out", str(tmp_path / "s"),
                                "--num", "4", "--steps", "2"]) == 0
    assert called and called[0]["steps"] == 2


# -----------------------------------------------------------------------------------------------
# An aux optimizer (a discriminator)
# -----------------------------------------------------------------------------------------------

def test_aux_module_steps_with_its_own_optimizer(toys, tmp_path, seed):
    tr = _trainer(tmp_path, "toy_disc", seed)
    disc = tr.aux["disc"].module
    assert all(p is not q for p in disc.parameters() for q in tr.params)  # not in the main optimizer
    w0 = disc.weight.detach().clone()
    seen = {}
    orig = tr._aux_step

    def spy(name, aux, batch, out):
        seen["grad_before"] = disc.weight.grad  # the generator's backward put nothing into it
        return orig(name, aux, batch, out)

    tr._aux_step = spy
    logs = tr.train_step(tr.make_batch(0))
    assert seen["grad_before"] is None and "disc_loss" in logs and "adv" in logs
    assert not torch.equal(disc.weight, w0) and disc.weight.requires_grad


def test_aux_module_and_method_state_resume(toys, tmp_path, seed):
    base = ["--method", "toy_disc", "--model-kwargs", SMALL, "--batch-size", "8", "--eval-every", "0", "--quiet",
            "--seed", str(seed % 1000), "--warmup", "2"]
    assert train_mod.main(["--out", str(tmp_path / "a"), "--steps", "4", *base]) == 0
    assert train_mod.main(["--out", str(tmp_path / "b"), "--steps", "2", *base]) == 0
    assert train_mod.main(["--out", str(tmp_path / "b"), "--steps", "4", "--resume", "auto", *base]) == 0
    a, b = load_checkpoint(str(tmp_path / "a" / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    for k, v in a["method"]["aux"]["disc"]["module"].items():
        torch.testing.assert_close(v, b["method"]["aux"]["disc"]["module"][k], rtol=0, atol=1e-6)
    sa, sb = a["method"]["aux"]["disc"]["optimizer"]["state"], b["method"]["aux"]["disc"]["optimizer"]["state"]
    for k in sa:
        torch.testing.assert_close(sa[k]["exp_avg"], sb[k]["exp_avg"], rtol=0, atol=1e-6)
    assert int(a["method"]["state"]["toy_disc"]["counter"]) == int(b["method"]["state"]["toy_disc"]["counter"]) == 4


# -----------------------------------------------------------------------------------------------
# Batch extras
# -----------------------------------------------------------------------------------------------

def test_batch_extras_reach_the_method(toys, tmp_path, seed):
    feat = torch.arange(48).float()[:, None].repeat(1, 3)
    tr = _trainer(tmp_path, "toy_feat", seed, _digits_like(seed, extras={"feat": feat}))
    batch = tr.make_batch(5)
    ToyFeat.seen.clear()
    tr.train_step(batch)
    assert torch.equal(ToyFeat.seen[-1], batch["feat"])
    rows = batch["feat"][:, 0].long()
    assert torch.equal(tr.ds.x[rows], batch["x"])  # each extra row belongs to its sample
    with pytest.raises(ConfigError, match=r"needs the per-sample arrays \['feat'\]"):
        _trainer(tmp_path, "toy_feat", seed)


def test_npz_extras_load_and_bad_extras_are_errors(tmp_path):
    p = tmp_path / "lat.npz"
    np.savez(p, x=np.zeros((5, 2, 4, 4), np.float32), y=np.arange(5), feat=np.ones((5, 3, 7), np.float32))
    ds = load_latents(str(p))
    assert set(ds.extras) == {"feat"} and ds.extras["feat"].shape == (5, 3, 7)
    np.savez(p, x=np.zeros((5, 2, 4, 4), np.float32), y=np.arange(5), feat=np.ones((4, 3), np.float32))
    with pytest.raises(DataError, match="'feat' must have one row per sample"):
        load_latents(str(p))


# -----------------------------------------------------------------------------------------------
# Checkpoints: the method is recorded, its state required; stale temp files go
# -----------------------------------------------------------------------------------------------

def _run(out, method, steps, *extra):
    return train_mod.main(["--out", str(out), "--method", method, "--model-kwargs", SMALL, "--steps", str(steps),
                           "--batch-size", "8", "--eval-every", "0", "--quiet", *extra])


def test_resume_with_another_method_is_an_error(toys, tmp_path, capsys):
    assert _run(tmp_path, "toy_align", 1) == 0
    assert _run(tmp_path, "sit", 2, "--resume", "auto") == 2
    err = capsys.readouterr().err
    assert "trained with --method 'toy_align', not --method 'sit'" in err


def test_checkpoint_without_the_methods_state_is_an_error(toys, tmp_path, capsys):
    assert _run(tmp_path, "toy_align", 1) == 0
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    ck["method"]["modules"] = {}
    save_checkpoint(ck, str(tmp_path / "last.pt"))
    assert _run(tmp_path, "toy_align", 2, "--resume", "auto") == 2
    assert "lacks the method's modules" in capsys.readouterr().err
    assert _run(tmp_path / "d", "toy_disc", 1) == 0
    ck = load_checkpoint(str(tmp_path / "d" / "last.pt"))
    ck["method"]["state"] = {}
    save_checkpoint(ck, str(tmp_path / "d" / "last.pt"))
    assert _run(tmp_path / "d", "toy_disc", 2, "--resume", "auto") == 2
    assert "lacks the method's state" in capsys.readouterr().err


def test_stale_checkpoint_temp_files_are_removed(tmp_path):
    stale = [tmp_path / "last.pt.abc123.tmp", tmp_path / "last.pt.zz.tmp"]
    for f in stale:
        f.write_bytes(b"partial")
    keep = tmp_path / "other.pt.x.tmp"
    keep.write_bytes(b"not ours")
    assert _run(tmp_path, "sit", 1) == 0
    assert not any(f.exists() for f in stale) and keep.exists()
    assert load_checkpoint(str(tmp_path / "last.pt"))["step"] == 1


# -----------------------------------------------------------------------------------------------
# The optimizer
# -----------------------------------------------------------------------------------------------

def test_fused_adamw_equals_unfused(seed):
    torch.manual_seed(seed)
    ps = [torch.randn(37, 19, requires_grad=True), torch.randn(5, requires_grad=True)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    tr_opt = make_optimizer(ps, torch.device("cpu"), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    assert tr_opt.defaults["fused"] is True
    ref = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, foreach=False)
    for _ in range(5):
        gs = [torch.randn_like(p) for p in ps]
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        tr_opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        # a few fp32 roundings apart: |diff| <= 8 ulp of the values
        assert (p - q).abs().max() <= 8 * torch.finfo(torch.float32).eps * q.abs().max()


# -----------------------------------------------------------------------------------------------
# Data parallel: an unused module, and a non-finite loss on one rank
# -----------------------------------------------------------------------------------------------

def _global_batch(ds, step, seed):
    """Step `step`'s global batch with its t and noise fixed, so any split over ranks sees the same draws."""
    g = torch.Generator().manual_seed(seed * 100 + step)
    idx = torch.randint(len(ds), (8,), generator=g)
    return {"x": ds.x[idx], "y": ds.y[idx], "t": torch.rand(8, generator=g), "noise": torch.randn(8, 1, 8, 8, generator=g),
            "generator": None}


def _shard(batch, rank, world):
    per = 8 // world
    return {k: (v[rank * per:(rank + 1) * per] if torch.is_tensor(v) else v) for k, v in batch.items()}


def _record_grads(tr):
    """The averaged gradients of the first step, as the optimizer sees them (None stays None)."""
    grads, step = {}, tr.opt.step

    def spy(*a, **k):
        if not grads:
            grads.update({n: (None if p.grad is None else p.grad.clone()) for n, p in tr.train_module.named_parameters()})
        return step(*a, **k)

    tr.opt.step = spy
    return grads


def _worker(rank, world, init_file, out, seed, method):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for k, v in TOYS.items():
        METHODS[k] = v
    try:
        tr = _trainer(out, method, seed)
        grads = _record_grads(tr)
        for step in range(3):
            tr.train_step(_shard(_global_batch(tr.ds, step, seed), rank, world))
        if rank == 0:
            torch.save({"sd": tr.train_module.state_dict(), "opt": tr.opt.state_dict(), "grads": grads,
                        "unused_grad": tr.modules["unused"].weight.grad if "unused" in tr.modules else 0},
                       os.path.join(out, "ddp.pt"))
    except FloatingPointError as e:
        with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
            f.write(str(e))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_with_an_unused_module_equal_one(toys, tmp_path, seed):
    s = seed % 1000
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), s, "toy_unused"), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    tr = _trainer(tmp_path / "one", "toy_unused", s)
    grads = _record_grads(tr)
    w0 = tr.modules["unused"].weight.detach().clone()
    for step in range(3):
        tr.train_step(_global_batch(tr.ds, step, s))
    # The first step's averaged gradients equal the combined batch's up to summation order. (The
    # weights after several AdamW steps are not compared elementwise: Adam divides by sqrt(v), so
    # a gradient near zero turns its rounding into a sign, up to 2 lr per step, either run.)
    for n, g in grads.items():
        if g is None:
            assert got["grads"][n] is None, n
        else:
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)
    sd = tr.train_module.state_dict()
    for k, v in sd.items():
        torch.testing.assert_close(got["sd"][k], v, rtol=0, atol=6 * 2e-3, msg=k)
    # the unused module: no gradient, so AdamW left it (and its state) alone, in both runs
    assert got["unused_grad"] is None and tr.modules["unused"].weight.grad is None
    assert torch.equal(got["sd"]["modules_.unused.weight"], w0)
    n_state = len(tr.opt.state_dict()["state"])
    assert len(got["opt"]["state"]) == n_state == len(tr.params) - 2


def test_non_finite_loss_on_one_rank_stops_every_rank(toys, tmp_path, seed):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed % 1000, "toy_nan"), nprocs=2, join=True)
    msgs = [(tmp_path / f"err{r}.txt").read_text() for r in (0, 1)]
    assert msgs[0] == msgs[1] and "not finite at step 0 on rank(s) [1] of 2" in msgs[0]


# -----------------------------------------------------------------------------------------------
# Learned sigma (DiT configs): the mean half trains and samples; a wrong shape is an error
# -----------------------------------------------------------------------------------------------

def test_learned_sigma_model_trains_on_the_mean_half_and_samples(tmp_path, seed):
    from effkernels.models.sampling.samplers import sample

    model = build("tiny/2", learn_sigma=True, depth=2, hidden_size=32, num_heads=2)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    res = FlowMatching().loss(model, x, torch.randint(0, 10, (4,)), t=torch.rand(4), noise=torch.randn(4, 1, 8, 8))
    assert res["pred"].shape == x.shape and res["loss_per_sample"].shape == (4,)
    out = sample(model.eval(), torch.arange(4), noise=torch.randn(4, 1, 8, 8), steps=2, cfg_scale=2.0)
    assert out.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="matches neither the target"):
        mean_prediction(torch.zeros(4, 3, 8, 8), x)
    assert _run(tmp_path, "sit", 1, "--model", "tiny/2", "--model-kwargs",
                '{"depth": 2, "hidden_size": 32, "num_heads": 2, "learn_sigma": true}') == 0


def test_forward_with_cfg_is_the_sampler_guidance(seed):
    from effkernels.models.backbone.guidance import guided_velocity

    model = build("tiny/2", learn_sigma=True, depth=2, hidden_size=32, num_heads=2).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    out = model.forward_with_cfg(x, torch.full((3,), 0.4), y, 2.5)
    assert out.shape == (3, 2, 8, 8)
    torch.testing.assert_close(out[:, :1], guided_velocity(model, x, 0.4, y, cfg_scale=2.5), rtol=0, atol=0)


# -----------------------------------------------------------------------------------------------
# A regular wheel carries every module
# -----------------------------------------------------------------------------------------------

def test_wheel_contains_every_python_file(tmp_path):
    env = {**os.environ, "EFFKERNELS_BUILD_EXT": "0"}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path), ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = set(zipfile.ZipFile(tmp_path / whl).namelist())
    want = set()
    for root, prefix in (("effkernels", "effkernels"), (os.path.join("python", "models"), "effkernels/models")):
        for d, _, files in os.walk(os.path.join(ROOT, root)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), os.path.join(ROOT, root)).replace(os.sep, "/")
                    want.add(f"{prefix}/{rel}")
    assert want and not (want - names), sorted(want - names)
    assert "effkernels/models/methods/sit.py" in names


def test_revert_effkernels_is_exported_beside_apply():
    import effkernels.models
    from effkernels.models.interop import patch as convert

    assert effkernels.models.apply_effkernels is convert.apply_effkernels
    assert effkernels.models.revert_effkernels is convert.revert_effkernels


def test_a_checkpoint_without_the_method_entry_is_a_clear_error(tmp_path, capsys):
    assert _run(tmp_path, "sit", 1) == 0
    ck = load_checkpoint(str(tmp_path / "last.pt"))
    del ck["method"]
    save_checkpoint(ck, str(tmp_path / "last.pt"))
    assert _run(tmp_path, "sit", 2, "--resume", "auto") == 2
    assert "has no method entry" in capsys.readouterr().err


def test_methods_use_only_the_trainer_api_the_protocol_documents():
    import re

    from effkernels.models.methods import base

    api = {"device", "ds", "model", "args", "ema_model", "steps_per_epoch", "save_named", "reset_optimizer",
           "reset_ema"}
    doc = base.__doc__
    assert all(re.search(rf"\b{name}\b", doc) for name in api)
    folder = os.path.dirname(base.__file__)
    used = {}
    for fn in os.listdir(folder):
        if fn.endswith(".py"):
            for m in re.finditer(r"\btrainer\.(\w+)", open(os.path.join(folder, fn)).read()):
                used.setdefault(m.group(1), set()).add(fn)
    assert set(used) <= api, {k: v for k, v in used.items() if k not in api}
    tr_cls = Trainer
    assert all(callable(getattr(tr_cls, n)) for n in ("ema_model", "steps_per_epoch", "save_named", "reset_optimizer",
                                                       "reset_ema"))
