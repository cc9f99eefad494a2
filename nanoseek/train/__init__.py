"""Training: one loop (loop.py) that every stage reuses, its schedule and checkpoints."""

from nanoseek.train.loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
