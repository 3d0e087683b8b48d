"""The CUDA kernels of csrc/ on the CUDA execution simulator (effkernels._C_sim, csrc/sim/): every
op family and dtype, the vector and the scalar load paths, against the reference, with the
simulator's memory checks on; the simulator's own semantics (shuffles, launch limits, guards); and
deliberately broken kernels it must catch, so that the harness itself can fail.

How: effkernels._ext's family modules call their raw ops through a module attribute `_C`; the
`on_sim` fixture points it at torch.ops.effkernels_sim, so the public ops with backend="cpp" run
their whole path (checks, autograd, output allocation) with the CUDA kernels executing on the
simulator. docs/cuda-simulator.md says what is and is not reproduced.
"""
import pytest
import torch

import effkernels._C_sim as S  # noqa: F401  (must import here: CI fails a skipped simulator test)
from effkernels import backends
from effkernels._ext import adaln as xadaln, align as xalign, rmsnorm as xrms, rope as xrope
from effkernels._ext import routing as xrouting, swiglu as xswiglu
from effkernels.ops import adaln as ops_adaln, rmsnorm as ops_rms, rope as ops_rope, routing as ops_routing
from effkernels.ops import swiglu as swiglu_op  # the function (effkernels.ops exports it)
from effkernels.reference import adaln as ref_adaln, rmsnorm as ref_rms, rope as ref_rope
from effkernels.reference import routing as ref_routing, swiglu as ref_swiglu

from test_ext import CUDA_CASES, DTYPES, _compare, _mods, check_cuda_kernels

SIM = torch.ops.effkernels_sim
FAMILIES = (xadaln, xalign, xrms, xrope, xrouting, xswiglu)


@pytest.fixture(autouse=True)
def on_sim(monkeypatch):
    for mod in FAMILIES:
        monkeypatch.setattr(mod, "_C", SIM)
    S.set_fault(0)
    S.set_race_checks(True)
    S.set_guard(True)
    S.launches()
    S.late_errors()
    try:
        yield
    finally:
        S.set_fault(0)
        S.set_guard(False)
    assert S.late_errors() == ""


def _vector_used(launches):
    return any(rec[3] == 16 for rec in launches)


def _assert_load_paths(log, D, dtype, misalign, reads_x):
    """Which load path each one-warp-per-row kernel took: 16-byte vectors when D allows and the rows
    are aligned; with x one element off alignment, the scalar path in every kernel reading x (the
    backward kernels read outputs and gradients, which are aligned, and may still vectorise)."""
    rows = [rec for rec in log if rec[2] == (32, 4, 1)]
    assert rows
    if D % (16 // torch.empty(0, dtype=dtype).element_size()) != 0:
        assert all(rec[3] < 16 for rec in log), log
    elif not misalign:
        assert all(rec[3] == 16 for rec in rows), rows
    else:
        assert all(rec[3] < 16 for rec in rows if rec[0].split("<")[0] in reads_x), rows


def test_simulator_reported():
    ok, why = backends.simulator_status()
    assert ok, why
    from effkernels.__main__ import report
    assert "simulator" in report()


# ---------------------------------------------------------------------------------------------
# Every case of the GPU-only test of test_ext.py, on the simulator
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,D,mod,misalign", CUDA_CASES)
def test_cuda_kernels_vs_reference_on_sim(seed, dtype, D, mod, misalign):
    check_cuda_kernels(seed, dtype, D, mod, misalign, "cpu", "cpp")
    log = S.launches()
    names = {rec[0].split("<")[0] for rec in log}
    assert {"ln_fwd_kernel", "ln_bwd_row_kernel", "gr_fwd_kernel", "gr_bwd_row_kernel", "cos_kernel",
            "route_kernel"} <= names, names
    if mod == "chunk":  # per-sample modulation: the column and finalize kernels ran
        assert {"col_kernel", "finalize_kernel"} <= names
    _assert_load_paths(log, D, dtype, misalign, ("ln_fwd_kernel", "gr_fwd_kernel"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 4, 100])
def test_column_reduction_chunks(seed, dtype, N):
    """Per-sample shift/scale/gate with weight and bias: the column kernel's (sample, chunk) grid over
    1, 1 and 4 chunks of 32 tokens (N = 100 leaves a partial last chunk), the finalize kernel's sums."""
    B, D = 2, 136
    x, y = torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype)
    gate, shift, scale = _mods("sample", B, N, D, dtype, 3)
    w, b = (1 + 0.1 * torch.randn(D)).to(dtype), (0.1 * torch.randn(D)).to(dtype)
    from test_ext import _fused64
    _compare(lambda *a: ops_adaln.gated_residual_modulate_layernorm(*a[:5], 1e-6, *a[5:], backend="cpp"),
             lambda *a: ref_adaln.gated_residual_modulate_layernorm(*a[:5], 1e-6, *a[5:]),
             lambda *a: _fused64(*a[:5], 1e-6, *a[5:]),
             [x, y, gate, shift, scale, w, b], dtype, ["x", "y", "gate", "shift", "scale", "weight", "bias"], seed)
    cols = [rec for rec in S.launches() if rec[0].startswith("col_kernel")]
    assert cols and all(rec[1] == (B * ((N + 31) // 32), 2, 1) for rec in cols), cols


# ---------------------------------------------------------------------------------------------
# RMSNorm family, SwiGLU, RoPE
# ---------------------------------------------------------------------------------------------

def _rms64(x, shift, scale, eps, w=None):
    xf = x.double()
    o = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    o = o * w.double() if w is not None else o
    sh, sc = shift.double(), scale.double()
    if sh.dim() == 2:
        sh, sc = sh[:, None], sc[:, None]
    return o * (1 + sc) + sh


def _rms_fused64(x, y, gate, shift, scale, eps, w=None):
    g = gate.double()
    g = g[:, None] if g.dim() == 2 else g
    h = x.double() + g * y.double()
    return h, _rms64(h, shift, scale, eps, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 17, 384, 1000])
@pytest.mark.parametrize("mod", ["token", "chunk"])
@pytest.mark.parametrize("misalign", [False, True])
def test_rmsnorm_on_sim(seed, dtype, D, mod, misalign):
    from test_ext import _maybe_misaligned
    B, N = 3, 37
    x = _maybe_misaligned((B, N, D), dtype, misalign, "cpu")
    y = torch.randn(B, N, D, dtype=dtype)
    gate, shift, scale = _mods(mod, B, N, D, dtype, 3)
    w = (1 + 0.1 * torch.randn(D)).to(dtype)
    eps = 0.1 if D == 1 else 1e-6  # D = 1: d(x) is a difference of nearly equal terms (see test_rmsnorm.py)
    _compare(lambda *a: ops_rms.gated_residual_rmsnorm_modulate(*a[:5], eps, a[5], backend="cpp"),
             lambda *a: ref_rms.gated_residual_rmsnorm_modulate(*a[:5], eps, a[5]),
             lambda *a: _rms_fused64(*a[:5], eps, a[5]),
             [x, y, gate, shift, scale, w], dtype, ["x", "y", "gate", "shift", "scale", "weight"], seed)
    _compare(lambda *a: ops_rms.rmsnorm_modulate(*a[:3], eps, a[3], backend="cpp"),
             lambda *a: ref_rms.rmsnorm_modulate(*a[:3], eps, a[3]),
             lambda *a: _rms64(*a[:3], eps, a[3]), [x, shift, scale, w], dtype, ["x", "shift", "scale", "weight"],
             seed)
    log = S.launches()
    names = {rec[0].split("<")[0] for rec in log}
    # the adaLN kernels' RMS variant (template flag RMS = true)
    assert {"ln_fwd_kernel", "ln_bwd_row_kernel", "col_kernel", "finalize_kernel"} <= names, names
    _assert_load_paths(log, D, dtype, misalign, ("ln_fwd_kernel",))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 13, 64, 200])
@pytest.mark.parametrize("misalign", [False, True])
def test_swiglu_on_sim(seed, dtype, H, misalign):
    """a and b are the halves of one (B, N, 2H) projection (row stride 2H), as in the MLP."""
    B, N = 2, 9
    m = int(misalign)
    p = torch.randn(B * N * 2 * H + m, dtype=dtype)[m:].view(B, N, 2 * H)
    a, b = p.chunk(2, -1)
    _compare(lambda u, v: swiglu_op(u, v, backend="cpp"), ref_swiglu.swiglu,
             lambda u, v: torch.nn.functional.silu(u.double()) * v.double(), [a, b], dtype, ["a", "b"], seed)
    log = S.launches()
    assert {rec[0].split("<")[0] for rec in log} == {"swiglu_kernel"}
    vec = not misalign and H % (16 // p.element_size()) == 0
    assert _vector_used(log) == vec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [2, 6, 64])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_rope_on_sim(seed, dtype, head_dim, pos_dtype):
    B, H, gh, gw = 2, 3, 3, 5
    N = gh * gw
    q, k = torch.randn(B, H, N, head_dim, dtype=dtype), torch.randn(B, H, N, head_dim, dtype=dtype)
    pos = ref_rope.grid_positions(gh, gw).to(pos_dtype).expand(B, N, 2)
    _compare(lambda u, v: ops_rope.rope2d(u, v, pos, backend="cpp"), lambda u, v: ref_rope.rope2d(u, v, pos),
             lambda u, v: ref_rope.rope2d(u.double(), v.double(), pos), [q, k], dtype, ["q", "k"], seed)
    assert {rec[0].split("<")[0] for rec in S.launches()} == {"rope_kernel"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_routing_on_sim(seed, dtype, idx_dtype):
    """gather, scatter onto x and onto zeros, and the out= forms: pure data movement, exact."""
    B, N, K, D = 3, 11, 6, 40
    x, sub = torch.randn(B, N, D, dtype=dtype), torch.randn(B, K, D, dtype=dtype)
    idx = ref_routing.draw_route(B, N, K, sort=False).to(idx_dtype)
    assert torch.equal(SIM.gather(x, idx), ref_routing.route_gather(x, idx))
    assert torch.equal(SIM.scatter(x, sub, idx, N), ref_routing.route_scatter(x, sub, idx))
    assert torch.equal(SIM.scatter(None, sub, idx, N), ref_routing.route_scatter(torch.zeros_like(x), sub, idx))
    out = torch.full((B, K, D), float("nan"), dtype=dtype)
    SIM.gather_out(x, idx, out)
    assert torch.equal(out, ref_routing.route_gather(x, idx))
    g = ops_routing.route_gather(x.requires_grad_(), idx, backend="cpp")
    dg = torch.randn_like(g)
    g.backward(dg)
    assert torch.equal(x.grad, ref_routing.route_scatter(torch.zeros_like(x), dg, idx))


def test_routing_bad_index_is_a_device_assert():
    x, idx = torch.randn(1, 4, 8), torch.tensor([[0, 9]])
    with pytest.raises(RuntimeError, match="device-side assertion failed: ok && \"idx value out of range\""):
        SIM.gather(x, idx)


# ---------------------------------------------------------------------------------------------
# The simulator itself: warp shuffles, launch limits, guards
# ---------------------------------------------------------------------------------------------

def _probe(grid, block, n, mask=0, lane_mask=0, width=32, exit_lanes=0):
    out = torch.full((n,), -7, dtype=torch.long)
    SIM.sim_probe(list(grid), list(block), out, mask, lane_mask, width, exit_lanes, 0, False)
    return out


def test_probe_thread_indexing():
    """Every thread of a 3-D grid of 3-D blocks writes its linear index exactly once."""
    n = 2 * 3 * 2 * (4 * 2 * 5)
    assert torch.equal(_probe((2, 3, 2), (4, 2, 5), n), torch.arange(n))


@pytest.mark.parametrize("lane_mask", [1, 2, 16, 31])
def test_shuffle_xor_full_warp(lane_mask):
    out = _probe((1, 1, 1), (64, 1, 1), 64, mask=0xFFFFFFFF, lane_mask=lane_mask)
    lane = torch.arange(64)
    assert torch.equal(out, (lane // 32) * 32 + ((lane % 32) ^ lane_mask))


def test_shuffle_xor_width_and_beyond_warp():
    """width 8: a source in a later segment returns the caller's own value, one in an earlier segment
    is read (CUDA's rule); a lane mask of 32 or more points past the warp: the caller's own value."""
    lane = torch.arange(32)
    out = _probe((1, 1, 1), (32, 1, 1), 32, mask=0xFFFFFFFF, lane_mask=8, width=8)
    assert torch.equal(out, torch.where((lane ^ 8) // 8 > lane // 8, lane, lane ^ 8))
    out = _probe((1, 1, 1), (32, 1, 1), 32, mask=0xFFFFFFFF, lane_mask=4, width=8)
    assert torch.equal(out, lane ^ 4)
    assert torch.equal(_probe((1, 1, 1), (32, 1, 1), 32, mask=0xFFFFFFFF, lane_mask=32), lane)


def test_shuffle_partial_mask():
    """Lanes 16..31 exit first; the other half shuffles among itself with mask 0xFFFF."""
    out = _probe((1, 1, 1), (16, 1, 1), 16, mask=0x0000FFFF, lane_mask=3)
    assert torch.equal(out, torch.arange(16) ^ 3)


@pytest.mark.parametrize("kw,match", [
    (dict(mask=0xFFFFFFFF, lane_mask=1, exit_lanes=4), "names lane 0, which has exited"),
    (dict(mask=0xFFFF0000, lane_mask=1), "is not in its own mask"),
    (dict(mask=0x0000FFFF, lane_mask=16), "which is not in the mask"),
    (dict(mask=0xFFFFFFFF, lane_mask=1, width=3), "width 3 is not a power of two"),
])
def test_shuffle_misuse_is_an_error(kw, match):
    with pytest.raises(RuntimeError, match=match):
        _probe((1, 1, 1), (32, 1, 1), 32, **kw)


def test_shuffle_partial_block_warp():
    """A block of 40 threads: its second warp has 8 lanes; a full mask names lanes it does not have."""
    with pytest.raises(RuntimeError, match="names lane 8, which this block"):
        _probe((1, 1, 1), (40, 1, 1), 40, mask=0xFFFFFFFF, lane_mask=1)


@pytest.mark.parametrize("grid,block", [
    ((1, 65536, 1), (1, 1, 1)), ((1, 1, 65536), (1, 1, 1)), ((0, 1, 1), (32, 1, 1)),
    ((1, 1, 1), (1025, 1, 1)), ((1, 1, 1), (32, 33, 1)), ((1, 1, 1), (1, 1, 65)),
])
def test_launch_limits(grid, block):
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        _probe(grid, block, 1)


def test_launch_at_the_limits():
    """The largest legal geometries launch (one thread per block keeps this fast)."""
    _probe((1, 65535, 1), (1, 1, 1), 65535)
    _probe((1, 1, 1), (1024, 1, 1), 1024)


@pytest.mark.parametrize("raw", [False, True])
def test_store_past_the_end_is_caught(raw):
    """Threads storing past a tensor's end: through vstore, an out-of-bounds error from the access
    check; with a plain store, from the guard bytes checked after the launch. Both name the kernel."""
    out = torch.empty(40, dtype=torch.long)
    SIM.sim_probe([1, 1, 1], [40, 1, 1], out, 0, 0, 32, 0, 0, raw)  # in bounds: fine
    match = "out-of-bounds store by kernel probe_kernel: byte 0 past the end" if raw else \
        "out-of-bounds store: bytes \\[320, 328\\) of a 320-byte tensor allocation\n.*probe_kernel"
    with pytest.raises(RuntimeError, match=match):
        SIM.sim_probe([1, 1, 1], [48, 1, 1], out, 0, 0, 32, 0, 3, raw)


# ---------------------------------------------------------------------------------------------
# Deliberately broken kernels: the harness must fail
# ---------------------------------------------------------------------------------------------

def test_fault_1_wrong_shuffle_offset_gives_wrong_results():
    x, shift, scale = torch.randn(2, 8, 64), torch.randn(2, 64), torch.randn(2, 64)
    want = ref_adaln.modulate_layernorm(x, shift, scale)
    assert torch.allclose(ops_adaln.modulate_layernorm(x, shift, scale, backend="cpp"), want, atol=1e-5)
    S.set_fault(1)
    got = ops_adaln.modulate_layernorm(x, shift, scale, backend="cpp")
    assert not torch.allclose(got, want, atol=1e-2)


def test_fault_2_row_bound_off_by_one_is_out_of_bounds():
    x, shift, scale = torch.randn(2, 5, 64), torch.randn(2, 64), torch.randn(2, 64)
    S.set_fault(2)
    with pytest.raises(RuntimeError, match="(out-of-bounds|in no tensor allocation).*\n.*ln_fwd_kernel"):
        ops_adaln.modulate_layernorm(x, shift, scale, backend="cpp")


def test_fault_3_vector_path_on_misaligned_rows():
    x = torch.randn(2 * 5 * 64 + 1)[1:].view(2, 5, 64)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    S.set_fault(3)
    with pytest.raises(RuntimeError, match="misaligned load of 16 bytes"):
        ops_adaln.modulate_layernorm(x, shift, scale, backend="cpp")


def test_fault_4_two_writers_per_row():
    x, idx = torch.randn(1, 6, 32), torch.tensor([[0, 1, 2, 3]])
    S.set_fault(4)
    with pytest.raises(RuntimeError, match="two threads store to one element"):
        SIM.gather(x, idx)


def test_race_checks_can_be_switched_off():
    """The same broken routing kernel without the writer check: no error, and a wrong result."""
    x, idx = torch.randn(1, 6, 32), torch.tensor([[0, 1, 2, 3]])
    S.set_fault(4)
    S.set_race_checks(False)
    got = SIM.scatter(None, x[:, :4].contiguous(), idx, 6)
    assert not torch.equal(got, ref_routing.route_scatter(torch.zeros_like(x), x[:, :4], idx))
