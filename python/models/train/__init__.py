"""The trainer (trainer.py) and what it keeps: step-indexed batches (batches.py), the EMA (ema.py), the run log (runlog.py), a generator rebuilt from a checkpoint (rebuild.py)."""
