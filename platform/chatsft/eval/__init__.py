"""Evaluation pieces: tasks, generation, metrics (the entry points are in chatsft.evaluate)."""
