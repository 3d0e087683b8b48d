"""The backbone: the DiT/SiT network (network.py), its position embeddings (positions.py), the named configs (configs.py), and classifier-free guidance (guidance.py)."""
