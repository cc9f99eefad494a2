"""End-to-end pipelines: the speedrun (tokenizer -> pretraining -> eval -> report) and the
RL speedrun (SFT -> GRPO -> held-out eval -> report) after it."""
