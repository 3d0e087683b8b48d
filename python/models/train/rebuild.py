"""A trained generator rebuilt from a checkpoint of effkernels-train: the backbone from its meta, the
method from the options it was trained with, the EMA (or raw) weights loaded into both."""
from __future__ import annotations

from ..backbone.configs import build
from ..checkpoint import CheckpointError
from ..methods import args_from_json, build_method


def model_from_checkpoint(ckpt: dict, ema: bool = True):
    """(model, meta): the backbone rebuilt from meta and loaded with the EMA (or raw) weights."""
    meta = ckpt.get("meta", {})
    if "model" not in meta:
        raise CheckpointError("checkpoint has no meta['model']: it was not written by effkernels-train")
    model = build(meta["model"], **meta.get("model_kwargs", {}))
    key = "ema" if ema and ckpt.get("ema") else "model"
    model.load_state_dict(ckpt[key])
    return model, meta


def generator_from_checkpoint(ckpt: dict, ema: bool = True):
    """(method, models, meta): the checkpoint's method rebuilt from its options, and the generator
    {"backbone": DiT, **the method's generator modules} loaded with the EMA (or raw) weights."""
    model, meta = model_from_checkpoint(ckpt, ema=ema)
    method = build_method(meta.get("method", "sit"), model, args_from_json(meta.get("args_json")))
    parts = ckpt.get("method") or {}
    modules = method.modules()
    models = {"backbone": model}
    for k in method.generator_modules:
        if ema and k in parts.get("ema", {}):
            sd = parts["ema"][k]
        else:
            sd = {n[len(k) + 1:]: v for n, v in parts.get("modules", {}).items() if n.startswith(k + ".")}
        if not sd:
            raise CheckpointError(f"checkpoint has no weights for the method's generator module {k!r}")
        modules[k].load_state_dict(sd)
        models[k] = modules[k].eval()
    return method, models, meta
