"""Training step of diffusers' transformers, unpatched vs effkernels.integrations.diffusers, side by side.

  python bench/bench_diffusers.py [--models dit,pixart,sd3,flux] [--heads 6] [--head-dim 64] [--depth 4]
                                  [--latent 32] [--text-tokens 32] [--batch 4] [--steps 3] [--warmup 1]
                                  [--repeats 3] [--backend auto] [--threads 0] [--device cpu|cuda] [--out DIR]

Rows: for each model class, the unpatched diffusers model ("diffusers") and the same weights with
apply_effkernels(model, backend=--backend) ("effkernels [backend]"). Both are built once and kept
(all in memory at once), initialised on the device. A step: forward on fixed random inputs, a mean-square loss, backward,
AdamW (torch's default, foreach) step, zero_grad. Shapes (defaults, SiT-S-like width at a
256-token 32x32 latent): hidden = heads x head_dim = 384, --depth blocks (Flux: --depth double
blocks and 2 x --depth single blocks; SD3: the last block context_pre_only as diffusers builds
it), patch size 2 (Flux: 1 on a 16x16 packed latent of 64 channels, also 256 tokens), --text-tokens
caption tokens for PixArt, SD3 and Flux. fp32 on the CPU; --device cuda adds bf16 autocast.

Timing: --repeats interleaved rounds (every row in turn, so a shared machine's drift hits each
alike); in each round a row runs --warmup untimed steps, then --steps timed ones. Reported: the
median round's s/step with the rounds' range, and speed vs diffusers = the median over rounds of
the unpatched row's time / the patched row's time in the same round (with its range). On CUDA also
the allocator's peak over the row's steps. Exit code 2 for a bad argument or a backend that cannot
run here; 3 when diffusers is not installed.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from _common import Bar, machine, machine_line, markdown_table, write_outputs

import effkernels
from effkernels import backends

MODELS = ("dit", "pixart", "sd3", "flux")


def build(name: str, a):
    """(model, inputs) of class `name` at the benchmark's shape, weights from seed 0."""
    import diffusers as d

    torch.manual_seed(0)
    B, H, hd, L, T = a.batch, a.heads, a.head_dim, a.latent, a.text_tokens
    D = H * hd
    if name == "dit":
        m = d.DiTTransformer2DModel(num_attention_heads=H, attention_head_dim=hd, in_channels=4, num_layers=a.depth,
                                    sample_size=L, patch_size=2, num_embeds_ada_norm=1000)
        inp = dict(hidden_states=torch.randn(B, 4, L, L), timestep=torch.randint(0, 1000, (B,)),
                   class_labels=torch.randint(0, 1000, (B,)))
    elif name == "pixart":
        m = d.PixArtTransformer2DModel(num_attention_heads=H, attention_head_dim=hd, in_channels=4, out_channels=8,
                                       num_layers=a.depth, cross_attention_dim=D, sample_size=L, caption_channels=D)
        inp = dict(hidden_states=torch.randn(B, 4, L, L), encoder_hidden_states=torch.randn(B, T, D),
                   timestep=torch.randint(0, 1000, (B,)), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif name == "sd3":
        m = d.SD3Transformer2DModel(sample_size=L, patch_size=2, in_channels=16, num_layers=a.depth, attention_head_dim=hd,
                                    num_attention_heads=H, joint_attention_dim=D, caption_projection_dim=D,
                                    pooled_projection_dim=D, out_channels=16, pos_embed_max_size=L)
        inp = dict(hidden_states=torch.randn(B, 16, L, L), encoder_hidden_states=torch.randn(B, T, D),
                   pooled_projections=torch.randn(B, D), timestep=torch.randint(0, 1000, (B,)))
    elif name == "flux":
        n = (L // 2) ** 2  # a 2x2-packed latent: the same token count as patch size 2
        rope = (hd // 4, 3 * hd // 8, hd - hd // 4 - 3 * hd // 8)
        m = d.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=a.depth, num_single_layers=2 * a.depth,
                                     attention_head_dim=hd, num_attention_heads=H, joint_attention_dim=D,
                                     pooled_projection_dim=D, axes_dims_rope=rope)
        inp = dict(hidden_states=torch.randn(B, n, 64), encoder_hidden_states=torch.randn(B, T, D),
                   pooled_projections=torch.randn(B, D), timestep=torch.rand(B), img_ids=torch.randn(n, 3),
                   txt_ids=torch.zeros(T, 3))
    else:
        raise ValueError(f"unknown model {name!r}")
    return m, inp


class Row:
    """One model on the device with its optimizer and inputs; step() is one training step."""

    def __init__(self, label: str, model, inputs: dict, device: torch.device, autocast: bool):
        self.label, self.device, self.autocast = label, device, autocast
        self.model = model.to(device).train()
        self.inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**self.inputs).sample
        out.float().square().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_rows(a, apply_effkernels) -> list[tuple[str, Row, Row]]:
    device = torch.device(a.device)
    out = []
    for name in a.models:
        with device:  # parameters initialised on the device: a 1152-wide Flux takes seconds on a CPU
            model, inp = build(name, a)
        patched = copy.deepcopy(model)
        report = apply_effkernels(patched, backend=None if a.backend == "auto" else a.backend, log=False)
        print(report, file=sys.stderr)
        out.append((name, Row(f"{name} diffusers", model, inp, device, a.autocast),
                    Row(f"{name} effkernels [{a.backend}]", patched, inp, device, a.autocast)))
    return out


def measure(a, rows) -> list[dict]:
    flat = [r for _, base, eff in rows for r in (base, eff)]
    times = {r.label: [] for r in flat}
    peak = {r.label: 0.0 for r in flat}
    bar = Bar(len(flat) * a.repeats, "bench_diffusers")
    for _ in range(a.repeats):
        for r in flat:
            if r.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(a.warmup):
                r.step()
            r.sync()
            t = time.perf_counter()
            for _ in range(a.steps):
                r.step()
            r.sync()
            times[r.label].append((time.perf_counter() - t) / a.steps)
            if r.device.type == "cuda":
                peak[r.label] = max(peak[r.label], torch.cuda.max_memory_allocated() / 2**20)
            bar.update(r.label)
    bar.close()
    out = []
    for name, base, eff in rows:
        for r in (base, eff):
            ts = times[r.label]
            ratio = [b / t for b, t in zip(times[base.label], ts)]
            rec = {"row": r.label, "model": name, "patched": r is eff, "backend": a.backend if r is eff else None,
                   "s_per_step": statistics.median(ts), "s_per_step_min": min(ts), "s_per_step_max": max(ts),
                   "images_per_s": a.batch / statistics.median(ts), "speed_vs_diffusers": statistics.median(ratio),
                   "speed_vs_diffusers_min": min(ratio), "speed_vs_diffusers_max": max(ratio),
                   "params": sum(p.numel() for p in r.model.parameters()), "rounds": len(ts), "times": ts,
                   "peak_mib": peak[r.label] if r.device.type == "cuda" else None}
            out.append(rec)
    return out


def render(rows: list[dict], head: str) -> str:
    table = markdown_table(
        ["row", "s/step (range)", "images/s", "speed vs diffusers (range)", "params", "peak MiB"],
        [[r["row"], f"{r['s_per_step']:.3g} ({r['s_per_step_min']:.3g}-{r['s_per_step_max']:.3g})",
          f"{r['images_per_s']:.3g}",
          f"{r['speed_vs_diffusers']:.2f} ({r['speed_vs_diffusers_min']:.2f}-{r['speed_vs_diffusers_max']:.2f})",
          f"{r['params'] / 1e6:.1f}M", "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"] for r in rows])
    return head + "\n\n" + table + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="blocks (Flux: double blocks; single blocks twice as many)")
    p.add_argument("--latent", type=int, default=32, help="latent height = width (tokens: (latent/2)^2)")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per round before the timed ones")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--backend", default="auto", help="the patched model's backend: " + ", ".join(backends.BACKENDS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="folder for diffusers.md, .csv and .json")
    a = p.parse_args(argv)
    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in a.models if m not in MODELS]
    if bad or not a.models:
        p.error(f"--models: unknown {', '.join(bad) or '(empty)'}; known: {', '.join(MODELS)}")
    for name in ("heads", "head_dim", "depth", "latent", "text_tokens", "batch", "steps", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0 or a.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if a.latent % 2 or a.head_dim % 8:
        p.error("--latent must be even (patch size 2) and --head-dim a multiple of 8 (Flux's rotary axes)")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device; none is visible")
    if a.backend not in backends.BACKENDS:
        p.error(f"--backend {a.backend!r} is unknown; known: {', '.join(backends.BACKENDS)}")
    if a.backend != "auto":
        ok, why = backends.available(a.backend, torch.device(a.device))
        if not ok or (a.backend == "triton" and a.device == "cpu"):
            p.error(f"--backend {a.backend} cannot run on {a.device} here: "
                    f"{why if not ok else 'the Triton interpreter is a test tool, not timed'}")
    a.autocast = a.device == "cuda"
    return a


def main(argv=None) -> int:
    a = parse(argv)
    try:
        import diffusers

        from effkernels.integrations.diffusers import apply_effkernels
    except ImportError as e:
        print(f"bench_diffusers: error: diffusers is not installed ({e}); pip install 'effkernels[diffusers]'",
              file=sys.stderr)
        return 3
    if a.threads:
        torch.set_num_threads(a.threads)
    m = machine()
    head = (f"diffusers training step, unpatched vs effkernels [{a.backend}]: hidden {a.heads}x{a.head_dim}, depth "
            f"{a.depth}, {(a.latent // 2) ** 2} image tokens, {a.text_tokens} text tokens, batch {a.batch}, {a.device}, "
            f"{'bf16 autocast' if a.autocast else 'fp32'}, AdamW; {a.repeats} interleaved rounds of {a.warmup} warm-up + "
            f"{a.steps} timed steps; median (range)\n{machine_line(m)}; diffusers {diffusers.__version__}\n"
            f"command: {m['command']}")
    print(head.split("\n")[0], file=sys.stderr)
    rows = make_rows(a, apply_effkernels)
    res = measure(a, rows)
    md = render(res, head)
    print(md)
    meta = {"machine": {**m, "diffusers": diffusers.__version__, "effkernels": effkernels.__version__},
            "args": vars(a)}
    for path in write_outputs(a.out, "diffusers", res, md, meta):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
