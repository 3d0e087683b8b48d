"""What the LayerNorm (test_adaln.py) and RMSNorm (test_rmsnorm.py) tests share: the leaves of a case
(x, y and adaLN's c, whose first three chunks are shift, scale and gate, plus the affine
parameters), the case list, and the comparison of a kernel with the reference, forward and every
input's gradient."""
import pytest
import torch

from helpers import assert_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd, non-power-of-two N and D; D = 1 normalises a single element (LayerNorm: to 0, RMSNorm: to +-1).
SHAPES = ((2, 7, 17), (1, 5, 384), (3, 3, 1000), (2, 9, 1))
NAMES = ("shift", "scale", "gate")  # the first three chunks of adaLN(c).chunk(6, -1): strided (B, D) views


def leaves(B, N, D, dtype, per_token, affine, bias):
    """Leaf tensors; shift/scale/gate are taken later as strided chunks of c (B, 6D) or (B, N, 6D).
    affine: a weight "w", and with `bias` a bias "b"."""
    c = 0.5 * torch.randn((B, N, 6 * D) if per_token else (B, 6 * D))
    lv = {"x": torch.randn(B, N, D) * 2 + 0.5, "y": torch.randn(B, N, D), "c": c}
    if affine:
        lv["w"] = 1 + 0.3 * torch.randn(D)
        if bias:
            lv["b"] = 0.3 * torch.randn(D)
    return {k: v.to(dtype) for k, v in lv.items()}


def mods(t):
    return dict(zip(NAMES, t["c"].chunk(6, -1)[:3]))


def bc(m):
    """A (B, D) per-sample modulation broadcast over tokens."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def run(fn, lv, upstream):
    """fn on tracked copies of the leaves; (outputs, gradients by name, c's chunks under NAMES)."""
    t = {k: v.detach().clone().requires_grad_() for k, v in lv.items()}
    outs = fn(t)
    sum((o.float() * g).sum() for o, g in zip(outs, upstream)).backward()
    grads = {k: v.grad for k, v in t.items() if k != "c"}
    grads.update(zip(NAMES, t["c"].grad.chunk(6, -1)[:3]))
    return [o.detach() for o in outs], grads


def cases(affine_word):
    """Every shape x dtype with (per-sample, no affine) and (per-token, affine); the two mixed
    combinations on one shape per dtype (rotating), to keep the interpreter's bill down."""
    out = []
    for i, dtype in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            combos = [(False, False), (True, True)] + ([(True, False), (False, True)] if j == i else [])
            for per_token, affine in combos:
                cid = f"{'per_token' if per_token else 'per_sample'}-{affine_word if affine else 'no_' + affine_word}"
                out.append(pytest.param(per_token, affine, dtype, shape,
                                        id=f"{cid}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}"))
    return out


def check(impls, op, lv, dtype, per_token, used, n_out):
    """The kernel of impls = (kernel, reference, same-dtype PyTorch) against the reference: outputs,
    and the gradients of the inputs in `used` that the case has (w, b only when affine), by the
    project's rule (16-bit: within twice PyTorch's own error in that dtype). Per-sample modulation
    and the affine parameters are reductions over tokens."""
    kern, refer, same = impls
    upstream = [torch.randn(lv["x"].shape) for _ in range(n_out)]
    k_out, k_grad = run(kern, lv, upstream)
    r_out, r_grad = run(refer, lv, upstream)
    s_out, s_grad = run(same, lv, upstream) if dtype != torch.float32 else (None, {})
    for i in range(n_out):
        assert k_out[i].dtype == dtype
        assert_close(k_out[i], r_out[i], dtype, name=f"{op} out{i}", same_dtype_ref=None if s_out is None else s_out[i])
    for k in used:
        if k in ("w", "b") and k not in lv:
            continue
        reduce = k in ("w", "b") or (k in NAMES and not per_token)
        assert k_grad[k].dtype == dtype and k_grad[k].shape == r_grad[k].shape, k
        assert_close(k_grad[k], r_grad[k], dtype, reduce=reduce, name=f"{op} d{k}", same_dtype_ref=s_grad.get(k))


def check_compile_keeps_ops(step, inputs, fwd_ops, bwd_ops):
    """fullgraph torch.compile of step(*inputs) (aot_eager, graphs recorded) gives eager's loss and
    gradients, and its forward and backward graphs keep our ops (names as in torch.ops.effkernels)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    rec = AotEagerAndRecordGraphs()
    compiled = torch.compile(step, fullgraph=True, backend=rec)
    grads = []
    for fn in (compiled, step):
        lv = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*lv)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in lv])
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, torch.float32, name="loss" if i == 0 else f"d(input {i - 1})")
    graph = "\n".join(str(g.graph) for g in rec.graphs)
    for op in fwd_ops:
        assert f"effkernels.{op}." in graph, op
    bw = "\n".join(str(g.graph) for g in rec.bw_graphs)
    for op in bwd_ops:
        assert op in bw, op
