"""Settings of an RL run (`nanoseek grpo`), with TRL GRPOTrainer's option names, each
meaning what it means in TRL 1.16 (loss_type: see objectives.normalise).

Defaults that differ from TRL's are listed in DIFFERS_FROM_TRL (name: (TRL's default, why));
tests/test_rl_objectives.py reads TRL's GRPOConfig and fails on any other difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.train.config import TrainConfig
from nanoseek.train.rl.objectives import LOSS_TYPES, SCALE_REWARDS

ALGOS = ("grpo", "ppo")

# name: (TRL 1.16's default, why nanoseek's differs)
DIFFERS_FROM_TRL = {
    "beta": (0.0, "0.02: DeepSeekMath's k3 KL to the starting (SFT) model"),
    "loss_type": ("dapo", "'grpo': DeepSeekMath's per-sequence mean"),
    "use_bias_correction_kl": (True, "False: DeepSeekMath's plain k3 term, which the RL "
                               "speedrun's figures in docs/rl.md were measured with"),
    "max_completion_length": (512, "None: the task's own generation budget"),
    "learning_rate": (1e-6, "train.lr 3e-4 with warm-up: stable for models of a few million "
                      "parameters on CPU, where lr 1e-3 destroyed the policy in ten steps"),
}


def rl_train_config(**kw) -> TrainConfig:
    base = dict(max_steps=100, batch_size=16, seq_len=1, lr=3e-4, warmup_steps=10,
                schedule="constant", weight_decay=0.0, grad_clip=1.0, eval_every=25,
                save_every=25, log_every=1, beta2=0.99)
    return TrainConfig(**{**base, **kw})


@dataclass
class RLConfig:
    init: str                             # the starting checkpoint (an SFT run's directory)
    task: str = "arithmetic"              # a task name or a .jsonl file (load_task)
    task_options: dict = field(default_factory=dict)
    algo: str = "grpo"                    # grpo | ppo (a critic, GAE: for comparison)
    train: TrainConfig = field(default_factory=rl_train_config)  # batch_size: prompts per step
    num_generations: int = 8              # G: completions per prompt
    temperature: float = 1.0
    max_completion_length: int | None = None  # default: the task's generation budget
    loss_type: str = "grpo"               # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"          # group | batch | none
    epsilon: float = 0.2                  # the clip's lower side (and upper, without epsilon_high)
    epsilon_high: float | None = None     # DAPO's clip-higher
    beta: float = 0.02                    # k3 KL weight; 0 loads no reference model
    use_bias_correction_kl: bool = False  # weigh the KL term by π_θ/π_old (TRL: True)
    num_iterations: int = 1               # optimizer passes over each rollout batch (μ)
    mask_truncated_completions: bool = False  # completions without eos teach nothing
    drop_equal_groups: bool = False       # drop groups whose G rewards are all equal
    eval_n: int = 200                     # held-out problems per evaluation (greedy)
    gamma: float = 1.0                    # PPO: discount
    lam: float = 0.95                     # PPO: GAE λ
    vf_coef: float = 0.5                  # PPO: value-loss weight
    cliprange_value: float = 0.2          # PPO: value clip

    def validate(self) -> None:
        def need(cond, name, msg):
            if not cond:
                raise ValueError(f"RL option '{name}': {msg}")
        need(self.algo in ALGOS, "algo", f"must be one of {ALGOS}, got {self.algo!r}")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        need(self.scale_rewards in SCALE_REWARDS, "scale_rewards",
             f"must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        need(self.num_generations >= 2 or self.algo == "ppo", "num_generations",
             f"GRPO needs >= 2 completions per prompt to compare, got {self.num_generations}")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (sampling; 0 would be greedy)")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(not (self.use_bias_correction_kl and self.algo == "ppo"), "use_bias_correction_kl",
             "weighs GRPO's k3 term; PPO puts its KL in the per-token reward (set algo=grpo)")
        need(self.train.batch_size * self.num_generations >= self.train.grad_accum, "grad_accum",
             "cannot exceed the completions per step (batch_size x num_generations)")
        need(self.train.save_every % self.num_iterations == 0, "save_every",
             f"must be a multiple of num_iterations={self.num_iterations} (a checkpoint between "
             "passes over one rollout would resume with a different rollout)")
        self.train.validate()

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
