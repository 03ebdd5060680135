"""Evaluation: the validation loss over prepared rows (loss.py), tasks scored by generation or
multiple choice (evaluate.py, tasks.py, generation.py, metrics.py)."""
