"""Interop with the official DiT/SiT/REPA code: loading their checkpoints (official.py) and patching their models with the fused ops (patch.py)."""
