"""Training: one loop (loop.py) that every stage reuses, with its settings (config.py),
schedule and target counts; pretrain.py and eval.py; run/ (the run directory), numerics/
(precision, compile, threads, MFU), posttrain/ (SFT, DPO, LoRA, QLoRA) and rl/ (GRPO, PPO)."""

__all__ = ["TrainConfig", "Trainer"]


def __getattr__(name: str):
    """TrainConfig and Trainer on first use: the settings modules (config.py, fields.py,
    run/run_settings.py) import no torch, so the CLI can build its options from them while
    `nanoseek --help` stays instant."""
    if name in __all__:
        from nanoseek.train import loop
        return getattr(loop, name)
    raise AttributeError(f"module 'nanoseek.train' has no attribute {name!r}")
