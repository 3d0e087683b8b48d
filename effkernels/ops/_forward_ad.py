"""Forward-mode AD (JVP) for the registered ops.

A torch.library.custom_op with only register_autograd drops tangents without an error (its
autograd kernel redispatches below autograd when nothing requires grad), and torch 2.14 has no
JVP registration for custom ops. So while a forward-AD level is open (torch.func.jvp, jacfwd,
linearize, or torch.autograd.forward_ad.dual_level, which torch.func opens too), each public op
calls its registered op through `rule(...)`, an autograd.Function:

  forward   the same registered op, so the primal is the same kernel's output, bit for bit;
  jvp       the op family's analytic tangent (effkernels.reference.jvp: plain torch, float32
            statistics, float64 kept float64), vmap-able, so jacfwd works too;
  backward  the VJP of the op's plain-torch reference (torch.func.vjp), so that reverse mode
            mixed with forward mode (forward-over-reverse: jvp of grad, Hessian-vector products)
            is exact too; plain reverse mode outside forward AD never comes here.

Outside forward AD the ops take their usual path; the test `active()` is one read of a module
global (a guard under torch.compile, no graph break). `forbid_tangents` is for the registered
backward functions: a backward reached with tangents (forward AD opened after the forward ran)
raises, naming the op, instead of dropping them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD


class ForwardADUnsupported(NotImplementedError):
    """An op path with no forward-mode rule was reached while forward AD is open (it would drop the
    tangent); the message names the op and the path that has a rule."""


def active() -> bool:
    """True while a forward-mode AD level is open (torch.func.jvp/jacfwd or forward_ad.dual_level)."""
    return fwAD._current_level >= 0


def forbid_tangents(op: str, *tensors) -> None:
    """Raise if forward AD is open and any of `tensors` carries a tangent: for code paths with no
    forward-mode rule (a registered backward, flash-attn), which would otherwise drop it."""
    if not active():
        return
    if any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise ForwardADUnsupported(
            f"effkernels.ops.{op}: this path has no forward-mode AD (JVP) rule and would drop the tangent; "
            f"run the op's forward under torch.func.jvp / forward_ad (its forward-mode path), or see "
            f"docs/forward-ad.md")


def rule(name: str, op: Callable, *, jvp: Callable, reference: Callable, outputs: int = 1):
    """An autograd.Function running the registered `op` with a forward-mode rule.

    op(*inputs) -> a tensor or a tuple whose first `outputs` entries are differentiable (the rest,
        statistics such as mean/rstd, are marked non-differentiable);
    jvp(inputs, out, tangents) -> the tangents of the differentiable outputs (a tuple of
        `outputs` tensors in the outputs' dtypes); `inputs` are op's arguments, `out` its outputs
        as a tuple, `tangents` one per input: a tensor for every tensor input (zeros where it has
        none), None for the others;
    reference(*inputs) -> the differentiable outputs (a tensor, or a tuple of `outputs`), plain
        torch: its VJP is the backward.
    Use: rule(...).apply(*inputs), with inputs exactly as op takes them.
    """

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        if len(outs) > outputs:
            ctx.mark_non_differentiable(*outs[outputs:])
        ctx.where = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.args = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        tensors = [inputs[i] for i in ctx.where]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors, *outs)
        ctx.n_out = len(outs)

    def _inputs(ctx, saved):
        args = list(ctx.args)
        for i, t in zip(ctx.where, saved):
            args[i] = t
        return args

    def jvp_fn(ctx, *tangents):
        saved = ctx.saved_tensors
        n = len(ctx.where)
        args = _inputs(ctx, saved[:n])
        tan = [None] * len(args)
        for i in ctx.where:
            t = tangents[i]
            tan[i] = torch.zeros_like(args[i]) if t is None else t
        d = jvp(args, tuple(saved[n:]), tan)
        d = d if isinstance(d, tuple) else (d,)
        if ctx.n_out == 1:
            return d[0]
        return (*d, *([None] * (ctx.n_out - outputs)))

    def backward(ctx, *grads):
        args = _inputs(ctx, ctx.saved_tensors)
        need = [i for i in ctx.where if ctx.needs_input_grad[i]]
        result = [None] * len(args)
        if not need:
            return tuple(result)

        def f(*ts):
            a = list(args)
            for i, t in zip(need, ts):
                a[i] = t
            r = reference(*a)
            return r if isinstance(r, tuple) else (r,)

        outs, vjp_fn = torch.func.vjp(f, *[args[i] for i in need])
        g = tuple(torch.zeros_like(o) if gi is None else gi.to(o.dtype) for o, gi in zip(outs, grads[:outputs]))
        for i, gi in zip(need, vjp_fn(g)):
            result[i] = gi
        return tuple(result)

    return type(f"ForwardAD_{name}", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda *inputs: op(*inputs)),
        "setup_context": staticmethod(setup_context),
        "jvp": staticmethod(jvp_fn),
        "backward": staticmethod(backward),
    })
