"""Training: the per-worker loop (loop.py), its data order (data.py), loss, schedules,
DeepSpeed config, checkpoints, export, and the TorchTrainer assembly (driver.py)."""
