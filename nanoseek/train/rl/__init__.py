"""Reinforcement learning on the shared loop: GRPO and PPO (grpo.py, ppo.py), their
objectives as pure tensor functions, TRL-named settings (config.py), rollouts by the engine,
shared-prefix batches and the RL run (run.py)."""
