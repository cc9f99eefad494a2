"""Post-training on the shared loop: SFT, DPO, LoRA and QLoRA adapters, and what these
stages share (stage.py: the model they start from, their checkpoints and run settings)."""
