"""Training objectives: flow matching (flow.py, SiT's), DDPM (ddpm.py, DiT's), and what a network's output means (prediction.py)."""
