"""`python -m effkernels`: versions, and which backend each op can and will use here, and why."""
from __future__ import annotations

import platform
import sys

import torch

from . import __version__, backends

OPS = ("route_gather", "route_scatter", "modulate_layernorm", "gated_residual",
       "gated_residual_modulate_layernorm", "per_token_cosine", "projected_cosine")


def table(device: torch.device) -> list[list[str]]:
    rows = []
    for op in OPS:
        row = [op]
        for b in ("reference", "triton", "cuda", "cpp"):
            ok, _ = backends.available(b, device)
            ok = ok and not (b == "cuda" and op in backends.NO_CUDA_KERNEL)
            row.append("yes" if ok else "-")
        try:
            chosen = backends.resolve(op, device)
            why = backends.auto_choice(op, device)[1] if backends.requested_backend(None) == "auto" \
                else "EFFKERNELS_BACKEND / use_backend"
        except RuntimeError as e:
            chosen, why = "error", str(e)
        row += [chosen, why]
        rows.append(row)
    return rows


def render(rows: list[list[str]], head: list[str]) -> str:
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def report() -> str:
    out = [f"effkernels {__version__}  python {platform.python_version()}  torch {torch.__version__}"]
    for name, (ok, why) in (("triton", backends.triton_status()), ("extension", backends.extension_status()),
                            ("simulator", backends.simulator_status()), ("flash-attn", backends.flash_attn_status())):
        out.append(f"  {name:<10} {'ok ' if ok else 'no '} {why}")
    out.append(f"  TRITON_INTERPRET={'1' if backends.interpreter_on() else '0'}  "
               f"requested backend: {backends.requested_backend(None)}")
    head = ["op", "reference", "triton", "cuda", "cpp", "auto picks", "why"]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        out += ["", f"{dev.type.upper()} tensors:", render(table(dev), head)]
    out += ["", "visible_attention: dense form -> SDPA; packed (cu_seqlens) form -> flash-attn varlen "
            "on fp16/bf16 CUDA tensors when flash_attn imports, else the Triton varlen kernel on CUDA tensors "
            "(fp32/fp16/bf16, Dh <= 128), else the reference per segment."]
    return "\n".join(out)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
