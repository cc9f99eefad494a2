"""Settings of an RL run (`nanoseek grpo`), with TRL GRPOTrainer's option names, each
meaning what it means in TRL 1.16 (loss_type: see objectives.normalise).

Defaults that differ from TRL's are listed in DIFFERS_FROM_TRL (name: (TRL's default, why));
tests/test_rl_objectives.py reads TRL's GRPOConfig and fails on any other difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.train.config import TrainConfig
from nanoseek.train.fields import check_settings, setting

ALGOS = ("grpo", "ppo")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # objectives.normalise's meanings
SCALE_REWARDS = ("group", "batch", "none")        # objectives.group_advantages' scalings

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
    """Each field's default, limits and help live in its `setting(...)`: `nanoseek grpo`
    builds its flags from them (cli/rl.py) and `validate` checks against the same limits
    (train/fields.py). This module imports no torch, so building the flags stays instant."""
    init: str                             # the starting checkpoint (an SFT run's directory)
    task: str = setting("arithmetic", help="arithmetic | countdown | FILE.jsonl")
    task_options: dict = field(default_factory=dict)
    algo: str = setting("grpo", help="algorithm (ppo: a critic + GAE, for comparison)", choices=ALGOS)
    train: TrainConfig = field(default_factory=rl_train_config)  # batch_size: prompts per step
    num_generations: int = setting(8, help="G: completions per prompt", lo=1, integer=True)
    temperature: float = setting(1.0, help="sampling temperature of the rollouts (0 would be greedy)",
                                 lo=0, lo_open=True)
    max_completion_length: int | None = setting(None, help="tokens per completion (default: the task's budget)",
                                                lo=1, integer=True, optional=True)
    loss_type: str = setting("grpo", help="loss normalisation (TRL's meanings; TRL's default: dapo)",
                             choices=LOSS_TYPES)
    scale_rewards: str = setting("group", help="advantage scaling", choices=SCALE_REWARDS)
    epsilon: float = setting(0.2, help="clip range (lower side; the upper too without --epsilon-high)",
                             lo=0, lo_open=True)
    epsilon_high: float | None = setting(None, help="upper clip (DAPO clip-higher; default epsilon)",
                                         lo=0, lo_open=True, optional=True)
    beta: float = setting(0.02, help="k3 KL weight (0: no reference model is loaded)", lo=0)
    use_bias_correction_kl: bool = setting(False, help="weigh the KL term by pi/pi_old (TRL's option; its default is on)")
    num_iterations: int = setting(1, help="optimizer passes per rollout batch", lo=1, integer=True)
    mask_truncated_completions: bool = setting(
        False, help="completions cut at the length limit (no eos) add nothing to the loss")
    drop_equal_groups: bool = setting(False, help="drop groups whose rewards are all equal")
    gradient_checkpointing: bool = setting(
        True, help="GRPO: recompute the policy's block activations in the backward (the same "
        "numbers, less memory, one more forward of the blocks per update)")
    eval_n: int = setting(200, help="held-out problems per evaluation", lo=1, integer=True)
    gamma: float = setting(1.0, help="PPO: discount", lo=0, hi=1)
    lam: float = setting(0.95, help="PPO: GAE lambda", lo=0, hi=1)
    vf_coef: float = setting(0.5, help="PPO: value-loss weight", lo=0)
    cliprange_value: float = setting(0.2, help="PPO: value clip", lo=0, lo_open=True)

    def validate(self) -> None:
        def need(cond, name, msg):
            if not cond:
                raise ValueError(f"RL option '{name}': {msg}")
        check_settings(self, "RL")
        need(self.num_generations >= 2 or self.algo == "ppo", "num_generations",
             f"GRPO needs >= 2 completions per prompt to compare, got {self.num_generations}")
        need(not (self.use_bias_correction_kl and self.algo == "ppo"), "use_bias_correction_kl",
             "weighs GRPO's k3 term; PPO puts its KL in the per-token reward (set algo=grpo)")
        need(self.train.batch_size * self.num_generations >= self.train.grad_accum, "grad_accum",
             "cannot exceed the completions per step (batch_size x num_generations)")
        need(self.train.save_every % self.num_iterations == 0, "save_every",
             f"must be a multiple of num_iterations={self.num_iterations} (a checkpoint between "
             "passes over one rollout would resume with a different rollout)")
        self.train.validate()

    def lr_factor(self, step: int) -> float:
        """What the schedule's rate is multiplied by at optimizer step `step` (0-based): 1
        here; distillation's on-policy steps may have a rate of their own (DistillConfig)."""
        return 1.0

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high
