"""SRA: the EMA teacher at less noise (per sample), same labels after dropout, its forward stopped
at its block, the head and the fused cosine, gradients only into the student, the CLI."""
import argparse
import copy

import numpy as np
import pytest
import torch

from effkernels.models.cli import train as train_mod
from effkernels.models.train.runlog import MetricsLog
from effkernels.models.train.trainer import Trainer
from effkernels.models.backbone.configs import build
from effkernels.models.objectives.ddpm import GaussianDiffusion
from effkernels.models.methods import Composite, ConfigError, build_method
from effkernels.models.methods.sra import SRA, default_pair
from helpers import digits_like_batch

SMALL = dict(depth=6, hidden_size=32, num_heads=2)


def _args(**kw):
    return argparse.Namespace(**kw)  # the options not given take the method's defaults


def _batch(seed, b=4):
    return digits_like_batch(seed, b)


def _setup(seed, **kw):
    model = build("tiny/2", **SMALL).train()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    teacher = copy.deepcopy(model).requires_grad_(False)
    for p in teacher.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    return model, teacher, SRA(model, _args(**kw), teacher=teacher)


def test_default_pairs_and_bad_options():
    # SiT-B: 3 -> 8, the authors' SiT-B script; XL: 8 -> 20 (SiT), 8 -> 16 (DiT-XL)
    assert default_pair(12) == (3, 8) and default_pair(28) == (8, 20) and default_pair(28, True) == (8, 16)
    assert SRA(build("tiny/2", depth=12, hidden_size=32, num_heads=2), _args()).student_depth == 3
    assert default_pair(6) == (2, 4)
    model = build("tiny/2", **SMALL)
    for kw, match in ((dict(sra_teacher_depth=7), "--sra-teacher-depth"), (dict(sra_t_max=1.5), "--sra-t-max"),
                      (dict(sra_weight=-1.0), "--sra-weight")):
        with pytest.raises(ConfigError, match=match):
            SRA(model, _args(**kw))
    assert SRA(model, _args(sra_loss="smooth_l1")).weight == 0.2


def test_teacher_sees_less_noise_same_labels_and_stops_at_its_block(seed):
    model, teacher, m = _setup(seed)
    model.y_embedder.dropout_prob = 0.5  # so that the labels' dropout matters
    seen, blocks_run = {}, []
    orig = teacher.forward

    def spy(x, t, y, **kw):
        seen.update(t=t.clone(), kw=kw)
        return orig(x, t, y, **kw)

    teacher.forward = spy
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: blocks_run.append(i)) for i, b in enumerate(teacher.blocks, 1)]
    batch = _batch(seed)
    res = Composite([("sra", m)]).loss(model, batch, 0)
    for h in hooks:
        h.remove()
    assert blocks_run == [1, 2, 3, 4]  # stopped at t_b = 4 of 6
    t_s, t = seen["t"], batch["t"]
    assert bool((t_s <= t).all()) and bool((t_s >= (t - 0.2).clamp(0, 1) - 1e-7).all()) and not torch.equal(t_s, t)
    drop = res["options"]["force_drop_ids"]
    assert torch.equal(seen["kw"]["force_drop_ids"], drop)  # the teacher gets the student's post-dropout labels
    assert "sra" in res and torch.isfinite(res["loss"])


def test_loss_is_the_fused_cosine_of_head_and_teacher_target(seed):
    model, teacher, m = _setup(seed, sra_weight=0.5)
    model.y_embedder.dropout_prob = 0.0
    batch = _batch(seed)
    res = Composite([("sra", m)]).loss(model, batch, 0)
    # by hand: t and noise are given, so the step generator's first draw is the teacher's U(0, 1)
    u = torch.rand(4, generator=torch.Generator().manual_seed(seed))
    t_s = (batch["t"] - 0.2 * u).clamp(0, 1)
    x_t = (1 - t_s.view(-1, 1, 1, 1)) * batch["x"] + t_s.view(-1, 1, 1, 1) * batch["noise"]
    with torch.no_grad():
        _, hid = teacher.eval()(x_t, t_s, batch["y"], stop_at=4, return_hidden=(4,))
    z_hat = m.head(res["hidden"][2])
    cos = torch.nn.functional.cosine_similarity(z_hat.double(), hid[4].double(), dim=-1)  # per token, over features
    torch.testing.assert_close(res["sra"].double(), -0.5 * cos.mean(), rtol=1e-5, atol=1e-7)


def test_gradients_reach_the_head_and_student_blocks_up_to_s_never_the_teacher(seed):
    model, teacher, m = _setup(seed)
    res = Composite([("sra", m)]).loss(model, _batch(seed), 0)
    res["sra"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert m.head[0].weight.grad is not None
    assert model.blocks[1].adaLN_modulation[-1].weight.grad.abs().sum() > 0  # block 2 = s
    assert all(p.grad is None or p.grad.abs().sum() == 0 for b in model.blocks[2:] for p in b.parameters())


def test_trains_through_the_cli_with_the_ema_as_teacher(tmp_path):
    argv = ["--out", str(tmp_path), "--method", "sra", "--model-kwargs", '{"depth": 6, "hidden_size": 32, "num_heads": 2}',
            "--batch-size", "16", "--eval-every", "0", "--quiet", "--log-every", "5", "--lr", "3e-3", "--steps", "30"]
    args = train_mod.parse_args(argv)
    tr = Trainer(args)
    sra = tr.method.parts[0][1]
    assert sra.teacher is tr.ema.model
    assert sra.steps_per_epoch == len(tr.ds) // 16  # the release counts epochs of full global batches
    assert train_mod.main(argv) == 0
    rows = MetricsLog.read(str(tmp_path / "metrics.jsonl"))
    assert rows[-1]["loss"] < rows[0]["loss"] and "sra" in rows[0]


def test_composes_with_tread_and_maskdit(tmp_path, seed):
    common = ["--model-kwargs", '{"depth": 6, "hidden_size": 32, "num_heads": 2}', "--batch-size", "8",
              "--eval-every", "0", "--quiet", "--steps", "2"]
    assert train_mod.main(["--out", str(tmp_path / "a"), "--method", "tread+sra", *common]) == 0
    assert train_mod.main(["--out", str(tmp_path / "b"), "--method", "maskdit+sra", *common]) == 0
    # a ratio per sample: packed kept tokens, the teacher's target gathered by the pack
    assert train_mod.main(["--out", str(tmp_path / "c"), "--method", "maskdit+sra", "--mask-ratio-range", "0.2:0.7",
                           "--log-every", "1", *common]) == 0
    row = MetricsLog.read(str(tmp_path / "c" / "metrics.jsonl"))[-1]
    assert np.isfinite(row["sra"]) and np.isfinite(row["loss"])
    # DiT's DDPM objective: the teacher at fewer integer steps of the same process
    dit = ["--model-kwargs", '{"depth": 6, "hidden_size": 32, "num_heads": 2, "learn_sigma": true}', *common[2:]]
    assert train_mod.main(["--out", str(tmp_path / "d"), "--method", "dit+sra", "--log-every", "1", *dit]) == 0
    row = MetricsLog.read(str(tmp_path / "d" / "metrics.jsonl"))[-1]
    assert np.isfinite(row["sra"]) and np.isfinite(row["loss"])


def test_smooth_l1_weight_follows_the_release_schedule():
    model = build("tiny/2", **SMALL)
    m = SRA(model, _args(sra_loss="smooth_l1"), steps_per_epoch=10)
    assert m.schedule == "release" and SRA(model, _args()).schedule == "constant"

    def release(epoch):  # the SRA release at 256 px: 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1)
        return 2 * 0.1 ** (((epoch - 149) / 1000 + 1) if epoch > 149 else 1)

    for step in (0, 9, 10, 1499, 1500, 1509, 6490, 11490, 20000):
        assert m.weight_at(step) == pytest.approx(release(step // 10), rel=1e-12), step
    assert m.weight_at(11490) == pytest.approx(0.02) and m.weight_at(1499) == 0.2
    fixed = SRA(model, _args(sra_loss="smooth_l1", sra_weight_schedule="constant"))
    assert fixed.weight_at(10 ** 7) == 0.2
    late = SRA(model, _args(sra_loss="smooth_l1", sra_decay_start=0.0, sra_decay_every=2.0), steps_per_epoch=1)
    assert late.weight_at(4) == pytest.approx(0.2 * 0.01)
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        SRA(model, _args(sra_loss="smooth_l1")).weight_at(5)
    with pytest.raises(ConfigError, match="--sra-decay-every"):
        SRA(model, _args(sra_decay_every=0.0))


def test_smooth_l1_term_uses_the_scheduled_weight(seed):
    model, teacher, m = _setup(seed, sra_loss="smooth_l1", sra_decay_start=0.0, sra_decay_every=1.0)
    m.steps_per_epoch = 1
    model.y_embedder.dropout_prob = 0.0
    r0 = Composite([("sra", m)]).loss(model, _batch(seed), 0)["sra"]
    r2 = Composite([("sra", m)]).loss(model, _batch(seed), 2)["sra"]  # same batch and draws, epoch 2: 100x less
    assert r0 > 0
    torch.testing.assert_close(r2, r0 * 0.01, rtol=1e-6, atol=0)


def test_head_is_xavier_uniform_with_zero_biases(seed):
    """The release initialises the head's Linears as every Linear of its model: xavier-uniform, bias 0."""
    print(f"seed={seed}")
    torch.manual_seed(seed)
    head = SRA(build("tiny/2", depth=6, hidden_size=64, num_heads=2), _args()).head
    for lin, (fan_out, fan_in) in ((head[0], (128, 64)), (head[2], (64, 128))):
        assert torch.count_nonzero(lin.bias) == 0
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = lin.weight.detach()
        assert float(w.abs().max()) <= bound
        # U(-a, a) has std a / sqrt(3); PyTorch's default (kaiming-uniform, a = 1/sqrt(fan_in)) is smaller
        assert float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)


def _teacher_spy(teacher):
    seen, orig = {}, teacher.forward

    def spy(x, t, y, **kw):
        seen.update(x=x.clone(), t=t.clone())
        return orig(x, t, y, **kw)

    teacher.forward = spy
    return seen


@pytest.mark.parametrize("spec", ["sra", "maskdit+sra", "dit+sra"])
def test_teacher_time_and_input_follow_the_objectives_own_forward_process(seed, spec):
    """For every objective SRA composes with, the teacher's t is never noisier than the student's, lies
    in the objective's own range, and its input is that objective's forward process at that t with
    the student's x and noise: flow matching (sit, maskdit) t - 0.2 U in [0, 1]; DDPM (dit) integer
    steps clamp(t - randint(0, 200), 1, 999), never above t."""
    print(f"seed={seed} spec={spec}")
    ddpm = spec.startswith("dit")
    model = build("tiny/2", **SMALL, learn_sigma=ddpm).train()
    model.y_embedder.dropout_prob = 0.0  # the step generator's first draw is then the teacher's
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    teacher = copy.deepcopy(model).requires_grad_(False)
    method = build_method(spec, model, argparse.Namespace(**vars(_args()), mask_ratio=0.5, mae_weight=0.1,
                                                          mask_ratio_range=None, decoder_depth=None,
                                                          decoder_width=None))
    sra = dict(method.parts)["sra"]
    sra.teacher = teacher
    seen = _teacher_spy(teacher)
    b = 8
    batch = _batch(seed, b)
    if ddpm:  # the steps of the reported defect, the ends of the range, and a draw
        batch["t"] = torch.tensor([963, 379, 427, 503, 0, 1, 999, 150])
    res = method.loss(model, batch, 0)
    t, t_s, x_s = batch["t"], seen["t"], seen["x"]
    assert "sra" in res and torch.isfinite(res["loss"])
    if ddpm:
        diffusion = res["diffusion"]
        assert isinstance(diffusion, GaussianDiffusion) and diffusion.num_steps == 1000
        steps = t_s.round().long()
        assert torch.equal(steps.float(), t_s)  # integer steps, given to the network as DiT's time
        k = torch.randint(0, 200, (b,), generator=torch.Generator().manual_seed(seed))
        want = torch.minimum((t - k).clamp(1, 999), t)  # DiT-SRA's rule, never above the student's step
        assert torch.equal(steps, want)
        assert bool((steps <= t).all()) and bool((steps >= 0).all()) and bool((steps[t >= 1] >= 1).all())
        assert bool((steps >= (t - 199).clamp(min=1).minimum(t)).all())
        assert int(steps[4]) == 0 and int(steps[5]) == 1  # a student at step 0 (1): the teacher at 0 (1)
        torch.testing.assert_close(x_s, diffusion.q_sample(batch["x"], steps, batch["noise"]), rtol=0, atol=0)
    else:
        u = torch.rand(b, generator=torch.Generator().manual_seed(seed))
        if spec.startswith("maskdit"):  # the mask's draw comes first
            assert bool((t_s <= t).all()) and bool((t_s >= (t - 0.2).clamp(0, 1) - 1e-7).all())
        else:
            torch.testing.assert_close(t_s, (t - 0.2 * u).clamp(0, 1), rtol=0, atol=0)
        assert t_s.is_floating_point() and bool((t_s <= t).all()) and bool(((t_s >= 0) & (t_s <= 1)).all())
        tt = t_s.view(-1, 1, 1, 1)
        torch.testing.assert_close(x_s, (1 - tt) * batch["x"] + tt * batch["noise"], rtol=0, atol=0)


def test_refuses_an_objective_without_t_and_noise(seed):
    model, teacher, m = _setup(seed)
    with pytest.raises(ConfigError, match="flow-matching .* or DDPM"):
        m.target({"hidden": {}, "options": {}}, _batch(seed))
