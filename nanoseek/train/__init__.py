"""Training: one loop (loop.py) that every stage reuses, with its settings (config.py),
schedule and target counts; pretrain.py and eval.py; run/ (the run directory), numerics/
(precision, compile, threads, MFU), posttrain/ (SFT, DPO, LoRA, QLoRA) and rl/ (GRPO, PPO)."""

from nanoseek.train.loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
