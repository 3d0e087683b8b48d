"""Paper presets: the papers' settings become defaults, flags override them, the start line says so;
--grad-clip 0 really leaves the gradients alone; the sampler side of a preset."""
import torch
from effkernels.models.cli import sample as sample_mod
from effkernels.models.cli import train as train_mod
from effkernels.models.train.trainer import Trainer
from effkernels.models.data.sources import ArrayDataset
import pytest
from effkernels.models.cli.presets import PRESETS, Preset, apply_preset

SMALL = '{"depth": 2, "hidden_size": 32, "num_heads": 2}'


def test_presets_set_the_papers_training_defaults(capsys):
    a = train_mod.parse_args(["--preset", "repa", "--out", "o", "--repa-encoder", "dinov2-vitb14:/w.pth"])
    assert (a.lr, a.warmup, a.batch_size, a.ema, a.ema_no_warmup, a.grad_clip, a.shuffle, a.method) == \
        (1e-4, 0, 256, 0.9999, True, 1.0, "epoch", "repa")
    assert "preset repa (REPA" in capsys.readouterr().out
    for name, clip, flip in (("dit", 0.0, True), ("sit", 0.0, True)):
        a = train_mod.parse_args(["--preset", name, "--out", "o"])
        assert (a.lr, a.warmup, a.batch_size, a.grad_clip, a.hflip, a.shuffle, a.method) == \
            (1e-4, 0, 256, clip, flip, "epoch", "sit")
    plain = train_mod.parse_args(["--out", "o"])  # no preset: the CPU digits defaults are untouched
    assert (plain.lr, plain.warmup, plain.batch_size, plain.shuffle, plain.grad_clip) == (2e-3, 100, 64, "replacement", 1.0)
    assert Preset.from_name("sit") is PRESETS["sit"]


def test_flags_override_a_preset_and_the_start_line_names_them(capsys):
    a = train_mod.parse_args(["--preset", "sit", "--lr", "3e-4", "--batch-size", "16", "--shuffle", "replacement",
                              "--out", "o"])
    assert (a.lr, a.batch_size, a.shuffle, a.ema, a.warmup) == (3e-4, 16, "replacement", 0.9999, 0)
    line = capsys.readouterr().out
    assert "overridden by flags: lr=0.0003 (preset 0.0001), batch_size=16 (preset 256), shuffle=replacement" in line
    assert a.preset_line in line


def test_sampling_side_of_a_preset():
    p = sample_mod.build_parser()
    preset, installed = apply_preset(p, ["--preset", "repa"], kind="sample")
    a = p.parse_args(["--ckpt", "c", "--out", "o", "--preset", "repa", "--guidance-high", "0.9"])
    assert (a.sampler, a.steps, a.cfg_scale, a.guidance_low, a.guidance_high) == ("euler-maruyama", 250, 1.8, 0.0, 0.9)
    assert installed["guidance_high"] == 0.7 and preset.name == "repa"


def _grads_seen(tr):
    seen = []
    step = tr.opt.step

    def spy(*a, **k):
        seen.append(torch.cat([p.grad.flatten() for p in tr.params if p.grad is not None]).norm().item())
        return step(*a, **k)

    tr.opt.step = spy
    return seen


def test_grad_clip_zero_means_no_clipping(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    ds = ArrayDataset(torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (32,), generator=g), 10, "r")
    norms = {}
    for clip in ("0", "1e-3"):
        a = train_mod.parse_args(["--out", str(tmp_path / clip), "--model-kwargs", SMALL, "--batch-size", "8",
                                  "--seed", str(seed), "--grad-clip", clip, "--eval-every", "0", "--quiet"])
        tr = Trainer(a, ds)
        seen = _grads_seen(tr)
        logs = tr.train_step(tr.make_batch(0))
        norms[clip] = (logs["grad_norm"], seen[0])
    raw, applied = norms["0"]
    assert raw > 1e-2 and abs(applied - raw) <= 1e-5 * raw  # unclipped: the optimizer sees the raw norm
    raw2, applied2 = norms["1e-3"]
    assert abs(raw2 - raw) <= 1e-5 * raw and abs(applied2 - 1e-3) <= 1e-6  # the same gradient, clipped


def test_a_preset_run_trains_on_digits(tmp_path, capsys):
    assert train_mod.main(["--preset", "sit", "--out", str(tmp_path), "--model-kwargs", SMALL, "--steps", "2",
                           "--batch-size", "16", "--eval-every", "0", "--ckpt-every", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "preset sit" in out and '"step": 2' in out


def test_every_method_has_a_paper_preset_printed_at_start(capsys):
    from effkernels.models.methods import METHODS

    assert set(METHODS) <= set(PRESETS)
    need = {"repa": ["--repa-encoder", "dinov2-vitb14:/w.pth"], "erw": ["--repa-encoder", "dinov2-vitb14:/w.pth"],
            "ct": ["--lpips-vgg", "/vgg.pth"], "act": ["--lpips-vgg", "/vgg.pth"]}
    for name, preset in PRESETS.items():
        a = train_mod.parse_args(["--preset", name, "--out", "o", *need.get(name, [])])
        assert a.method == (preset.method or "sit") and a.lr == preset.lr and a.ema == preset.ema
        assert a.ema_no_warmup  # every paper's EMA decays at its rate from step 0
        for dest, value in preset.options:
            assert getattr(a, dest) == value, (name, dest)
        assert f"preset {name} (" in capsys.readouterr().out
    sra = train_mod.parse_args(["--preset", "sra", "--out", "o"])
    assert (sra.ema, sra.ema_no_warmup) == (0.9999, True)  # SRA's teacher EMA
    act = train_mod.parse_args(["--preset", "act", "--out", "o", "--lpips-vgg", "/vgg.pth"])
    assert (act.lr, act.act_d_lr, act.batch_size, act.ct_s1, act.ct_mu0, act.act_lambda_schedule) == \
        (5e-5, 5e-5, 640, 200, 0.95, "t-weighted")
    md = train_mod.parse_args(["--preset", "maskdit", "--out", "o"])
    assert (md.batch_size, md.mask_ratio, md.mae_weight, md.hflip) == (1024, 0.5, 0.1, True)


@pytest.mark.parametrize("argv,match", [
    (["--preset", "repa"], "--preset repa needs --repa-encoder"),
    (["--preset", "erw"], "--preset erw needs --repa-encoder"),
    (["--preset", "ct"], "--preset ct needs --lpips-vgg"),
    (["--preset", "act"], "--preset act needs --lpips-vgg"),
])
def test_a_preset_without_its_pretrained_file_is_an_error(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.parse_args(argv + ["--out", "o"])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_a_requirement_lapses_when_a_flag_changes_what_needs_it():
    a = train_mod.parse_args(["--preset", "ct", "--ct-distance", "pseudo_huber", "--out", "o"])
    assert a.ct_distance == "pseudo_huber" and a.lpips_vgg is None
    a = train_mod.parse_args(["--preset", "repa", "--method", "sit", "--out", "o"])
    assert a.method == "sit"


def test_the_consistency_presets_sample_in_one_step():
    p = sample_mod.build_parser()
    _, installed = apply_preset(p, ["--preset", "act"], kind="sample")
    assert installed["steps"] == 1


def test_sra_says_at_start_when_the_ema_is_not_its_teachers(tmp_path, capsys):
    argv = ["--method", "sra", "--model-kwargs", SMALL, "--steps", "1", "--batch-size", "8", "--eval-every", "0",
            "--ckpt-every", "0", "--quiet"]
    assert train_mod.main(["--out", str(tmp_path / "a"), *argv]) == 0
    assert "its paper's is 0.9999 from step 0" in capsys.readouterr().out
    assert train_mod.main(["--out", str(tmp_path / "b"), "--ema", "0.9999", "--ema-no-warmup", *argv]) == 0
    assert "its paper's" not in capsys.readouterr().out
