"""effkernels.integrations.diffusers and .tread on diffusers' own model classes, tiny random configs
on CPU tensors: the patched model's forward and every parameter gradient match the unpatched model
(fp32 and bf16 autocast, reference / cpp / triton-interpreter backends), torch.compile of the
patched model, AdamW steps, revert bit-identical, unsupported modules reported by name, the version
check; TREAD over the block list equal to a dense run of the routed blocks on the kept tokens."""
import contextlib
import json
import logging
import os
import re
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.normalization import AdaLayerNorm, AdaLayerNormContinuous, AdaLayerNormZero
from helpers import TOL, TOL_REDUCE, rel_err

from effkernels import ops
from effkernels.integrations import diffusers as effd
from effkernels.integrations.tread import RoutedBlocks, apply_tread, remove_tread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 3


# ------------------------------------------------------------------------------------------------
# Tiny models of each supported class, and their inputs
# ------------------------------------------------------------------------------------------------

def dit():
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                              sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m, dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.randint(0, 1000, (B,)),
                   class_labels=torch.randint(0, 10, (B,)))


def pixart():
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=16, sample_size=8, caption_channels=12)
    return m, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                   timestep=torch.randint(0, 1000, (B,)), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3():
    # block 1 with SD3.5's dual attention (SD35AdaLayerNormZeroX), block 2 the context_pre_only last block
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,))
    return m, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                   pooled_projections=torch.randn(B, 10), timestep=torch.randint(0, 1000, (B,)))


def flux():
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
                               axes_dims_rope=(2, 2, 4))
    n, t = 16, 5
    return m, dict(hidden_states=torch.randn(B, n, 8), encoder_hidden_states=torch.randn(B, t, 12),
                   pooled_projections=torch.randn(B, 10), timestep=torch.rand(B), img_ids=torch.randn(n, 3),
                   txt_ids=torch.zeros(t, 3))


MODELS = {"dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux}
# What apply_effkernels patches in each tiny model (class -> count) and leaves (name -> class).
PATCHED = {
    "dit": {"AdaLayerNormZero": 2, "BasicTransformerBlock": 2},
    "pixart": {"BasicTransformerBlock": 2},
    "sd3": {"AdaLayerNormContinuous": 2, "AdaLayerNormZero": 2, "JointTransformerBlock": 2, "SD35AdaLayerNormZeroX": 1},
    "flux": {"AdaLayerNormContinuous": 1, "AdaLayerNormZero": 2, "AdaLayerNormZeroSingle": 2,
             "FluxSingleTransformerBlock": 2, "FluxTransformerBlock": 1},
}
LEFT = {"dit": {"norm_out"}, "pixart": {"adaln_single", "norm_out"}, "sd3": set(), "flux": set()}


def build(name: str, seed: int = 0):
    """The tiny model, off its initialisation (every modulation and gate nontrivial), and its inputs."""
    torch.manual_seed(seed)
    m, inp = MODELS[name]()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, inp


def run(m, inp, *, autocast=False, seed=7):
    """Output and loss of one training-mode forward (DiT's label dropout draws from a reseeded stream)."""
    torch.manual_seed(seed)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = m(**inp).sample
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)  # a fixed projection: every output matters
    return out, (out.float() * w).sum()


def grads(m, inp, **kw):
    m.zero_grad(set_to_none=True)
    out, loss = run(m, inp, **kw)
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _floor(ref_g) -> float:
    """1e-4 of the whole gradient's norm: the denominator's floor per parameter. The key biases'
    gradients vanish in exact arithmetic (a softmax ignores a shift of every logit of a row), so
    theirs are rounding noise (~1e-7 here, against a whole gradient of ~100) with no relative size;
    the other gradients' norms lie above the floor (the smallest, SD3's joint-attention key bias,
    ~0.026 against a floor of ~0.015; most are 0.1 to 10)."""
    return 1e-4 * torch.cat([v.double().flatten() for v in ref_g.values()]).norm().item()


def assert_matches(out, g, ref_out, ref_g, tol_out, tol_grad):
    assert set(g) == set(ref_g) and len(g) > 10
    e = rel_err(out, ref_out)
    assert e <= tol_out, f"output: relative error {e:.3e} > {tol_out:.1e}"
    floor = _floor(ref_g)
    for n in ref_g:
        e = rel_err(g[n], ref_g[n], floor)
        assert e <= tol_grad, f"grad of {n}: relative error {e:.3e} > {tol_grad:.1e}"


# ------------------------------------------------------------------------------------------------
# Patched vs unpatched
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_forward_and_every_grad_match_fp32(name, backend, caplog):
    m, inp = build(name)
    ref_out, ref_g = grads(m, inp)
    keys = list(m.state_dict())
    params = [id(p) for p in m.parameters()]
    with caplog.at_level(logging.INFO, logger="effkernels.integrations.diffusers"):
        report = effd.apply_effkernels(m, backend=backend)
    assert report.counts() == PATCHED[name] and set(report.left) == LEFT[name]
    assert str(report) in caplog.text  # logged
    assert list(m.state_dict()) == keys and [id(p) for p in m.parameters()] == params
    out, g = grads(m, inp)
    # the gradients of shift/scale/gate reduce over tokens in another order than torch's: TOL_REDUCE
    assert_matches(out, g, ref_out, ref_g, TOL[torch.float32], TOL_REDUCE[torch.float32])


# Attention key biases: their gradient is a sum that cancels exactly in self-attention (a softmax
# ignores a shift of a whole row of logits) and nearly in joint attention, so its rounding noise has
# no relative size; per-parameter checks that cannot use a floor skip them (the whole-gradient check
# and the fp32 checks include them).
KEY_BIAS = re.compile(r"(to_k|add_k_proj)\.bias$")


def _flat(g: dict) -> torch.Tensor:
    return torch.cat([g[n].double().flatten() for n in sorted(g)])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", list(MODELS))
def test_patched_matches_under_bf16_autocast(name, backend):
    """bf16 autocast: the patched model's error against the fp32 model at most the bf16 tolerance,
    or twice the unpatched bf16 model's own error (flash-attention's rule): output, whole gradient,
    each parameter's gradient (key biases aside, see KEY_BIAS)."""
    m, inp = build(name)
    f32_out, f32_g = grads(m, inp)
    bf_out, bf_g = grads(m, inp, autocast=True)
    effd.apply_effkernels(m, backend=backend)
    out, g = grads(m, inp, autocast=True)
    assert out.dtype == bf_out.dtype
    tol = TOL[torch.bfloat16]
    assert rel_err(out, f32_out) <= max(tol, 2 * rel_err(bf_out, f32_out))
    assert rel_err(_flat(g), _flat(f32_g)) <= max(tol, 2 * rel_err(_flat(bf_g), _flat(f32_g)))
    floor = _floor(f32_g)
    for n in f32_g:
        if KEY_BIAS.search(n):
            continue
        own = rel_err(bf_g[n], f32_g[n], floor)
        e = rel_err(g[n], f32_g[n], floor)
        assert e <= max(tol, 2 * own), f"grad of {n}: {e:.3e} vs unpatched bf16's {own:.3e}"


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_triton_backend_under_the_interpreter(name):
    m, inp = build(name)
    ref_out, ref_g = grads(m, inp)
    effd.apply_effkernels(m, backend="triton")
    out, g = grads(m, inp)
    assert_matches(out, g, ref_out, ref_g, TOL[torch.float32], TOL_REDUCE[torch.float32])


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_patched_model_matches_eager(name):
    """torch.compile(fullgraph=True) (aot_eager: AOTAutograd's graphs, eager kernels; inductor costs
    minutes here) of the patched model on the cpp backend: one graph holding our custom ops, forward
    and grads equal to eager."""
    m, inp = build(name)
    effd.apply_effkernels(m, backend="cpp")
    ref_out, ref_g = grads(m, inp)
    torch._dynamo.reset()
    traced = []

    def backend(gm, example_inputs):  # aot_eager, noting which ops the captured graph holds
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    cm = torch.compile(m, backend=backend, fullgraph=True)  # fullgraph: no graph break anywhere
    out, g = grads(cm, inp)
    g = {n.removeprefix("_orig_mod."): v for n, v in g.items()}
    assert_matches(out, g, ref_out, ref_g, TOL[torch.float32], TOL_REDUCE[torch.float32])
    assert {t for t in traced if "effkernels" in t} >= {"effkernels.gated_residual.default",
                                                       "effkernels.modulate_layernorm.default"}


@pytest.mark.parametrize("name", list(MODELS))
def test_adamw_steps_match(name):
    steps, params = {}, {}
    for patched in (False, True):
        m, inp = build(name)
        if patched:
            effd.apply_effkernels(m, backend="cpp")
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
        losses = []
        for i in range(3):
            opt.zero_grad(set_to_none=True)
            _, loss = run(m, inp, seed=i)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        steps[patched], params[patched] = losses, {n: p.detach().clone() for n, p in m.named_parameters()}
    assert steps[True] == pytest.approx(steps[False], rel=1e-5, abs=1e-5)
    # Adam normalises each gradient element, so one whose gradient is zero in exact arithmetic (see
    # KEY_BIAS) moves by ~lr in a direction set by rounding noise, in either model: those are skipped,
    # and checked to be key biases only (exactly zero gradients, e.g. the text queries of SD3's last
    # block, whose output is dropped, are compared: weight decay alone moves them)
    m, inp = build(name)
    _, g = grads(m, inp)
    noise = {n for n, v in g.items() if 0 < v.norm().item() < _floor(g)}
    assert all(KEY_BIAS.search(n) for n in noise), noise
    for n, p in params[False].items():
        if n not in noise:
            assert rel_err(params[True][n], p) <= 1e-5, n


@pytest.mark.parametrize("name", list(MODELS))
def test_revert_restores_bit_identical_outputs(name):
    m, inp = build(name)
    with torch.no_grad():
        before = run(m, inp)[0]
        effd.apply_effkernels(m, backend="cpp")
        assert effd.patched_modules(m)
        again = effd.apply_effkernels(m, backend="cpp")  # idempotent
        assert all(v.endswith("(already patched)") for v in again.patched.values())
        back = effd.revert(m)
        assert set(back.reverted) == set(again.patched)
        assert effd.patched_modules(m) == {} and not any("forward" in mod.__dict__ for mod in m.modules())
        assert torch.equal(run(m, inp)[0], before)


class LowRank(torch.nn.Module):
    """A LoRA-style layer around a linear (what peft's layer swap puts in the linear's place)."""

    def __init__(self, base: torch.nn.Linear, r: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, r, bias=False)
        self.up = torch.nn.Linear(r, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_linears_swapped_after_patching_and_gradient_checkpointing_are_honoured(name):
    """The patched forwards call their submodules by attribute: a linear swapped in after patching
    (as LoRA adapters do, here the adaLN linear of the first norm) is used, and diffusers' gradient
    checkpointing (which calls the blocks through torch.utils.checkpoint) runs the patched blocks."""
    ref, inp = build(name)
    m, _ = build(name)
    effd.apply_effkernels(m, backend="cpp")
    for model in (ref, m):
        norm = model.transformer_blocks[0].norm1
        torch.manual_seed(1)
        norm.linear = LowRank(norm.linear)
        model.enable_gradient_checkpointing()
    ref_out, ref_g = grads(ref, inp)
    out, g = grads(m, inp)
    assert any(".norm1.linear.up." in n for n in g)
    assert_matches(out, g, ref_out, ref_g, TOL[torch.float32], TOL_REDUCE[torch.float32])


# ------------------------------------------------------------------------------------------------
# What is left, and why; the version range
# ------------------------------------------------------------------------------------------------

class OwnForward(AdaLayerNormZero):
    def forward(self, x, emb=None):
        return super().forward(x, emb=emb)


def test_unsupported_modules_are_reported_by_name(caplog):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([
        BasicTransformerBlock(16, 2, 8, norm_type="ada_norm", num_embeds_ada_norm=10),  # AdaLayerNorm: not covered
        BasicTransformerBlock(16, 2, 8, norm_type="ada_norm_zero", num_embeds_ada_norm=10)])
    model.rms = AdaLayerNormContinuous(16, 16, elementwise_affine=False, norm_type="rms_norm")
    model.own = OwnForward(16)
    rep = effd.apply_effkernels(model, backend="reference")
    assert set(rep.patched) == {"blocks.1", "blocks.1.norm1"}
    assert "norm_type 'ada_norm' is not covered" in rep.left["blocks.0"]
    assert rep.left["blocks.0.norm1"] == "AdaLayerNorm: type not covered"
    assert "RMSNorm, not a LayerNorm" in rep.left["rms"]
    assert "subclass of AdaLayerNormZero with its own forward" in rep.left["own"]
    assert isinstance(model.blocks[0].norm1, AdaLayerNorm) and "forward" not in model.blocks[0].__dict__
    with caplog.at_level(logging.WARNING, logger="effkernels.integrations.diffusers"):
        none = effd.apply_effkernels(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert none.patched == {} and "0 modules patched" in caplog.text  # never silently nothing


def test_version_range_is_checked_and_declared_once(monkeypatch):
    effd.check_diffusers_version(diffusers.__version__)
    effd.check_diffusers_version("0.42.0")
    for bad in ("0.41.2", "0.43.0.dev0", "1.0.0"):
        with pytest.raises(RuntimeError, match=re.escape(f"diffusers {bad} is outside") + ".*allow_other_versions"):
            effd.check_diffusers_version(bad)
    m, _ = build("dit")
    monkeypatch.setattr(diffusers, "__version__", "0.41.0")
    with pytest.raises(RuntimeError, match=re.escape(effd.DIFFUSERS_REQUIREMENT)):
        effd.apply_effkernels(m)
    assert not effd.patched_modules(m)
    assert effd.apply_effkernels(m, allow_other_versions=True).patched
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'^diffusers = \["' + re.escape(effd.DIFFUSERS_REQUIREMENT) + r'"\]', text, re.MULTILINE)


def test_arguments_and_a_missing_diffusers_are_clear_errors(monkeypatch):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        effd.apply_effkernels("model")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        effd.apply_effkernels(torch.nn.Linear(2, 2), backend="cuda-please")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'effkernels\[diffusers\]'"):
        effd.apply_effkernels(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# TREAD over the block list
# ------------------------------------------------------------------------------------------------

def _dense_on_kept(m, start, end, idx):
    """Hooks that run blocks start..end (1-based) of the plain model on the kept tokens, with torch's
    own indexing: gather before `start`, write the kept rows back into the start-1 state after `end`."""
    blocks, saved = list(m.transformer_blocks), {}
    rows = torch.arange(idx.shape[0])[:, None]

    def pre(mod, args, kwargs):
        saved["full"] = args[0]
        return (args[0][rows, idx],) + args[1:], kwargs

    def post(mod, args, kwargs, out):
        full = saved["full"].clone()
        full[rows, idx] = out
        return full

    return [blocks[start - 1].register_forward_pre_hook(pre, with_kwargs=True),
            blocks[end - 1].register_forward_hook(post, with_kwargs=True)]


@pytest.mark.parametrize("name,start,end", [("dit", 1, 2), ("dit", 2, 2), ("pixart", 1, 1)])
@pytest.mark.parametrize("patched", [False, True])
def test_tread_equals_a_dense_run_of_the_routed_blocks_on_the_kept_tokens(name, start, end, patched):
    m, inp = build(name)
    if patched:
        effd.apply_effkernels(m, backend="cpp")
    n = 16  # tokens of the tiny models' 8x8 latents at patch size 2
    idx = ops.draw_route(B, n, 7, generator=torch.Generator().manual_seed(3))
    hooks = _dense_on_kept(m, start, end, idx)
    ref_out, ref_g = grads(m, inp)
    for h in hooks:
        h.remove()
    dense_out, _ = grads(m, inp)
    keys = list(m.state_dict())
    blocks = apply_tread(m, start, end, backend="reference")
    assert isinstance(m.transformer_blocks, RoutedBlocks) and list(m.state_dict()) == keys
    with blocks.route(idx):
        out, g = grads(m, inp)
    assert_matches(out, g, ref_out, ref_g, TOL[torch.float32], TOL_REDUCE[torch.float32])
    assert rel_err(out, dense_out) > 1e-3  # the route changed the prediction
    assert torch.equal(grads(m, inp)[0], dense_out)  # no route set: dense, bit for bit
    remove_tread(m)
    assert type(m.transformer_blocks) is torch.nn.ModuleList and list(m.state_dict()) == keys


def test_tread_identity_route_is_the_dense_model_and_errors_name_their_argument():
    m, inp = build("dit")
    dense = run(m, inp)[0]
    blocks = apply_tread(m, 1, 2)
    with blocks.route(torch.arange(16).expand(B, 16)):
        assert torch.equal(run(m, inp)[0], dense)
    with pytest.raises(ValueError, match="1 <= start <= end <= 2"):
        RoutedBlocks(list(blocks), 2, 3)
    with pytest.raises(ValueError, match="idx"), blocks.route(torch.tensor([[0, 0]] * B)):  # a duplicate position
        run(m, inp)
    with blocks.route(torch.arange(4).expand(B, 4)), pytest.raises(ValueError, match="attention_mask"):
        list(blocks)[0](torch.randn(B, 16, 16), attention_mask=torch.ones(B, 16))
    with pytest.raises(TypeError, match="model.blocks must be an nn.ModuleList"):
        apply_tread(m, 1, 1, attr="blocks")


# ------------------------------------------------------------------------------------------------
# The docs' examples run as written
# ------------------------------------------------------------------------------------------------

def _doc_blocks() -> list[str]:
    text = open(os.path.join(ROOT, "docs", "diffusers.md")).read()
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def test_docs_examples_run_as_written():
    blocks = _doc_blocks()
    assert len(blocks) >= 5  # one per supported class, TREAD, revert
    for code in blocks:
        torch.manual_seed(0)
        exec(compile(code, "docs/diffusers.md", "exec"), {"__name__": "docs_example"})


# ------------------------------------------------------------------------------------------------
# The benchmark harness (bench/bench_diffusers.py): a well-formed table from one tiny run
# ------------------------------------------------------------------------------------------------

def test_bench_harness_writes_one_row_pair_per_model(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import bench_diffusers

    rc = bench_diffusers.main(["--heads", "2", "--head-dim", "16", "--depth", "1", "--latent", "8",
                               "--text-tokens", "4", "--batch", "2", "--steps", "1", "--warmup", "0",
                               "--repeats", "2", "--backend", "cpp", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "diffusers.json").read_text())
    assert res["machine"]["diffusers"] == diffusers.__version__
    rows = res["rows"]
    assert [r["row"] for r in rows] == [f"{m} {k}" for m in MODELS for k in ("diffusers", "effkernels [cpp]")]
    assert all(r["rounds"] == 2 and r["s_per_step"] > 0 and r["speed_vs_diffusers"] > 0 for r in rows)
    assert all(r["speed_vs_diffusers"] == 1.0 for r in rows if not r["patched"])
    assert "speed vs diffusers" in (tmp_path / "diffusers.md").read_text()
    with pytest.raises(SystemExit):
        bench_diffusers.parse(["--models", "unet"])
    assert "--models: unknown unet" in capsys.readouterr().err
