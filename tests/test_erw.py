"""ERW: the warm-up trains only the region on clean inputs with the alignment loss, the transition
keeps the warmed weights (model and EMA) and restarts the rest and the optimizer, the weight
schedule, resume across the phases, and independence of the process count."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from effkernels.models.methods import encoders as enc
from effkernels.models.cli import train as train_mod
from effkernels.models.train.trainer import Trainer
from effkernels.models.checkpoint import load_checkpoint
from effkernels.models.data.sources import ArrayDataset
from effkernels.models.methods import ConfigError

KW = '{"depth": 4, "hidden_size": 32, "num_heads": 2, "class_dropout_prob": 0.0}'


class PatchEncoder(torch.nn.Module):
    """A fixed random patch encoder (REPA's protocol): one 8-d token per 2x2 patch."""
    dim = 8

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 2, 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            torch.nn.init.normal_(self.conv.weight)
            torch.nn.init.zeros_(self.conv.bias)

    def encode(self, images):
        return self.conv(images).flatten(2).transpose(1, 2)


@pytest.fixture(autouse=True)
def _toy_encoder(monkeypatch):
    monkeypatch.setitem(enc.ENCODERS, "toy", lambda arg, *, grid: PatchEncoder())


def _ds(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g), 10, "r")


def _argv(out, *extra):
    return ["--out", str(out), "--method", "erw", "--repa-encoder", "toy", "--model-kwargs", KW, "--batch-size", "8",
            "--eval-every", "0", "--quiet", "--warmup", "0", "--erw-warmup-steps", "3", "--erw-region", "2",
            "--repa-depth", "3", "--log-every", "1", *extra]


def _trainer(out, *extra):
    return Trainer(train_mod.parse_args(_argv(out, *extra)), _ds())


def test_options_and_schedule(tmp_path):
    tr = _trainer(tmp_path, "--erw-c0", "4", "--erw-half-life", "10")
    erw = tr.method.parts[0][1]
    assert (erw.warmup_steps, erw.region, erw.depth, erw.c0) == (3, 2, 3, 4.0)
    assert erw.weight_at(3) == 4.0 and erw.weight_at(13) == pytest.approx(2.0) and erw.weight_at(23) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="--erw-region"):
        _trainer(tmp_path, "--erw-region", "4")


def test_warmup_trains_the_region_only_on_clean_inputs(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    erw = tr.method.parts[0][1]
    seen = []
    fwd = tr.model.forward

    def spy(x, t, y, **kw):
        seen.append((t.clone(), kw))
        return fwd(x, t, y, **kw)

    monkeypatch.setattr(tr.model, "forward", spy)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    batch = tr.make_batch(0)
    logs = tr.train_step(batch)
    (t, kw), = seen
    assert torch.count_nonzero(t) == 0 and kw["stop_at"] == 2  # t = 0: the clean input; blocks 1..2
    assert "erw_align" in logs and "repa" not in logs
    after = tr.model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("blocks.0.") for k in moved) and any(k.startswith("blocks.1.") for k in moved)
    assert not any(k.startswith(("blocks.2.", "blocks.3.", "final_layer.")) for k in moved)
    # the loss is 0.5 x the fused cosine averaged over EVERY sample (ERW's release counted one)
    with torch.no_grad():
        _, h = tr.model(batch["x"], torch.zeros(8), batch["y"], stop_at=2, return_hidden=(2,))
        z = PatchEncoder().encode(batch["x"])
        z_hat = erw.projectors[0].project(h[2])
        per_sample = torch.nn.functional.cosine_similarity(z_hat, z, dim=-1).mean(1)
        assert erw.objective(tr.model, batch, 0, {})["loss"].item() == pytest.approx(-0.5 * per_sample.mean().item(), rel=1e-5)


def test_transition_keeps_the_warmed_weights_and_restarts_the_rest(tmp_path):
    tr = _trainer(tmp_path)
    for s in range(3):
        tr.train_step(tr.make_batch(s))
    warm = {k: v.clone() for k, v in tr.model.state_dict().items()}
    proj = {k: v.clone() for k, v in tr.modules.state_dict().items()}
    assert len(tr.opt.state) > 0
    tr.method.before_step(tr, 3)
    sd = tr.model.state_dict()
    for k in sd:
        if k.startswith(("x_embedder", "t_embedder", "y_embedder", "pos_embed", "blocks.0.", "blocks.1.")):
            assert torch.equal(sd[k], warm[k]), k
    fresh = [k for k in sd if k.startswith(("blocks.2.", "blocks.3.", "final_layer."))]
    assert fresh and all(torch.count_nonzero(sd[k]) == 0 for k in fresh if "adaLN_modulation.1" in k)
    assert any(not torch.equal(sd[k], warm[k]) for k in fresh if k.endswith("attn.qkv.weight"))
    assert all(torch.equal(v, proj[k]) for k, v in tr.modules.state_dict().items())  # projector carried over
    assert len(tr.opt.state) == 0  # a fresh optimizer
    ema = tr.ema.model.state_dict()
    assert all(torch.equal(ema[k], sd[k]) for k in sd)  # the EMA restarts from the warmed model
    assert os.path.isfile(tmp_path / "erw_warmup.pt") and load_checkpoint(str(tmp_path / "erw_warmup.pt"))["step"] == 3
    logs = tr.train_step(tr.make_batch(3))
    assert "repa" in logs and "loss_base" in logs


def test_resume_across_the_phases_equals_one_run(tmp_path):
    assert train_mod.main(_argv(tmp_path / "a", "--steps", "6")) == 0
    assert train_mod.main(_argv(tmp_path / "b", "--steps", "2")) == 0
    assert train_mod.main(_argv(tmp_path / "b", "--steps", "6", "--resume", "auto")) == 0
    a, b = load_checkpoint(str(tmp_path / "a" / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert int(a["method"]["state"]["erw"]["transitioned"]) == 1
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    enc.ENCODERS["toy"] = lambda arg, *, grid: PatchEncoder()
    tr = Trainer(train_mod.parse_args(_argv(out)), _ds())
    for s in range(2):
        b = tr.make_batch(s)
        b.pop("generator")
        full = _global(tr, s)
        tr.train_step({k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()})
    if rank == 0:
        torch.save(tr.model.state_dict(), os.path.join(out, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _global(tr, step):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(len(tr.ds), (8,), generator=g)
    return {"x": tr.ds.x[idx], "y": tr.ds.y[idx]}


def test_warmup_does_not_depend_on_the_process_count(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    tr = _trainer(tmp_path / "one")
    for s in range(2):
        tr.train_step(_global(tr, s))
    for k, v in tr.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
