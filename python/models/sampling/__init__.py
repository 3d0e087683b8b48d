"""Sampling: the flow ODE/SDE samplers and the dispatcher (samplers.py), DDPM/DDIM (ddpm.py), image files (images.py)."""
