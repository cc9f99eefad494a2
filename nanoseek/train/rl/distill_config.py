"""Settings of an on-policy distillation run (`nanoseek distill`): an RL run's settings
(rollouts, loss normalisation, evaluation, the training loop's) plus the teachers, one per
task, and where the samples come from. Like config.py it imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.train.fields import check_settings, setting
from nanoseek.train.rl.config import RLConfig

SAMPLERS = ("student", "teacher")  # on-policy (OPD) | off-policy (SFT on the teachers' samples)


@dataclass
class DistillConfig(RLConfig):
    """`init` is the student; `teachers[i]` serves the prompts of `tasks[i]` (with
    `tasks_options[i]`), weighted by `teacher_weights[i]` (default 1 each)."""
    algo: str = setting("opd", help="the objective (train/rl/opd.py)", choices=("opd",))
    teachers: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    tasks_options: list = field(default_factory=list)
    teacher_weights: list = field(default_factory=list)
    samples_from: str = setting(
        "student", help="student: on-policy distillation (reverse KL on the student's samples); "
        "teacher: off-policy distillation (SFT on each teacher's own samples), for comparison",
        choices=SAMPLERS)
    cold_start_steps: int = setting(
        0, help="the first N steps learn from the teachers' own samples (SFT, as --samples-from "
        "teacher) before the student samples: reverse KL barely moves a token the student never "
        "samples, so a student that does not yet write the teachers' format learns it first", lo=0,
        integer=True)
    on_policy_lr: float | None = setting(
        None, help="the learning rate of the steps where the student samples (after the cold "
        "start), on the same schedule; unset: --lr. The cold start is SFT and takes SFT's rate; "
        "the reverse-KL steps are RL-like updates on the student's own samples", lo=0, lo_open=True, optional=True)
    num_generations: int = setting(1, help="completions per prompt", lo=1, integer=True)
    beta: float = setting(0.0, help="unused by distillation (no reference model)", lo=0, hi=0)

    def __post_init__(self):
        if self.tasks and not self.task_options and self.tasks_options:
            self.task_options = dict(self.tasks_options[0])
        if self.tasks:
            self.task = self.tasks[0]  # RLStage's first task (engine sizing, logs)

    def validate(self) -> None:
        def need(cond, name, msg):
            if not cond:
                raise ValueError(f"distill option '{name}': {msg}")
        check_settings(self, "distill")
        need(len(self.tasks) >= 1, "task", "give at least one --task (and one --teacher for each)")
        need(len(self.teachers) == len(self.tasks), "teacher",
             f"one --teacher per --task, in the same order: got {len(self.teachers)} teacher(s) "
             f"for {len(self.tasks)} task(s)")
        need(not self.tasks_options or len(self.tasks_options) == len(self.tasks), "tasks_options",
             f"one options dict per task, got {len(self.tasks_options)} for {len(self.tasks)}")
        need(not self.teacher_weights or len(self.teacher_weights) == len(self.teachers),
             "teacher_weight", f"one weight per teacher, got {len(self.teacher_weights)} for "
             f"{len(self.teachers)}")
        need(all(isinstance(w, (int, float)) and w > 0 for w in self.teacher_weights),
             "teacher_weight", f"weights must be numbers > 0, got {self.teacher_weights}")
        need(self.train.batch_size % len(self.tasks) == 0, "batch_size",
             f"prompts per step ({self.train.batch_size}) must split evenly over the "
             f"{len(self.tasks)} tasks")
        need(self.train.batch_size * self.num_generations >= self.train.grad_accum, "grad_accum",
             "cannot exceed the completions per step (batch_size x num_generations)")
        need(self.train.save_every % self.num_iterations == 0, "save_every",
             f"must be a multiple of num_iterations={self.num_iterations}")
        need(self.samples_from == "student" or not self.cold_start_steps, "cold_start_steps",
             "only for on-policy distillation (--samples-from student): off-policy runs learn "
             "from the teachers' samples at every step already")
        need(self.cold_start_steps % self.num_iterations == 0, "cold_start_steps",
             f"must be a multiple of num_iterations={self.num_iterations} (whole rollouts)")
        need(self.on_policy_lr is None or self.samples_from == "student", "on_policy_lr",
             "only for on-policy distillation (--samples-from student): an off-policy run has "
             "no on-policy steps")
        self.train.validate()

    def lr_factor(self, step: int) -> float:
        """What the schedule's rate is multiplied by at optimizer step `step` (0-based)."""
        if self.on_policy_lr is None or self.off_policy(step):
            return 1.0
        return self.on_policy_lr / self.train.lr

    def off_policy(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) learns from the teachers' samples."""
        return self.samples_from == "teacher" or step < self.cold_start_steps

    def weight(self, i: int) -> float:
        return float(self.teacher_weights[i]) if self.teacher_weights else 1.0

    def options(self, i: int) -> dict:
        return dict(self.tasks_options[i]) if self.tasks_options else {}
