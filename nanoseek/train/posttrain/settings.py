"""The settings of the post-training stages: LoRA adapters, SFT and DPO.

Each field declares its default, its allowed values and its help once, in its
`setting(...)` (train/fields.py): `nanoseek sft` and `nanoseek dpo` build their flags from
these declarations (cli/posttrain.py), and `validate` checks Python callers, run.toml
files and flags against the same limits, so a bad value gets the same one-line error
from each. Importing this module imports no torch, so building the flags keeps
`nanoseek --help` instant; sft.py, dpo.py and lora.py re-export what they use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.train.config import TrainConfig
from nanoseek.train.fields import check_settings, setting

LORA_TARGETS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """r = 0: no adapters (full fine-tuning). qlora: the frozen base's targeted linears are
    stored in 4-bit NF4 (see qlora.py). Each field's help and limits live in its
    `setting(...)`: the CLI's --lora-* flags are built from them (train/fields.py)."""
    r: int = setting(0, help="LoRA rank (0: no adapters; --lora and --qlora need >= 1)", lo=0, integer=True)
    alpha: float = setting(16.0, help="LoRA alpha (scale alpha / r)")
    dropout: float = setting(0.0, help="LoRA dropout on the adapters' input", lo=0, hi=1, hi_open=True)
    targets: list[str] = setting(help="comma-separated linears to adapt",
                                 default_factory=lambda: list(LORA_TARGETS))
    qlora: bool = setting(False, help="LoRA over a base stored in 4-bit NF4 (bitsandbytes)")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self) -> None:
        check_settings(self, "LoRA")
        if self.qlora and not self.r:
            raise ValueError("--qlora trains LoRA adapters over a 4-bit base: give --lora-r > 0")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown:
            raise ValueError(f"--lora-targets: unknown module name(s) {unknown}; the model's "
                             f"linears are {list(LORA_TARGETS)}")


def check_fp4_without_lora(lora: LoraSettings, train: TrainConfig) -> None:
    """--fp4-experts-from trains the routed experts' fp32 masters through FP4 (quant/fp4_qat.py);
    LoRA freezes them (QLoRA even stores them in NF4) and puts adapters beside the Linears the
    switch would change, so the two are refused together rather than half-applied."""
    if lora.enabled and train.fp4_experts_from is not None:
        raise ValueError("--fp4-experts-from with --lora/--qlora is not supported: FP4 QAT trains the "
                         "routed experts' own weights, which LoRA freezes; drop one of them")


def sft_train_config(**kw) -> TrainConfig:
    """Small-model SFT defaults: a lower peak rate than pretraining (3e-3) since the model
    already knows the language, short warm-up, no decay on a run this short."""
    base = dict(max_steps=0, batch_size=8, seq_len=256, lr=5e-4, warmup_steps=10,
                weight_decay=0.0, eval_every=0, save_every=100, min_lr_ratio=0.1)
    return TrainConfig(**{**base, **kw})


@dataclass
class SFTConfig:
    init: str                                    # checkpoint + tokenizer to start from
    data: list[str] = setting(help="JSONL: {\"messages\": [...]} or {\"prompt\", \"response\"} rows (repeat)",
                              default_factory=list)
    task: str | None = setting(None, help="train on a task's demonstrations instead")
    task_examples: int = setting(1000, help="task examples to train on", lo=1, integer=True)
    task_options: dict = field(default_factory=dict)  # e.g. {"digits": 2} (load_task's options)
    epochs: float = setting(3.0, help="passes over the data (sets --max-steps when not given)")
    packing: bool = setting(True, help="several conversations per window")
    val_fraction: float = setting(0.0, help="share of conversations held out for val_loss",
                                  lo=0, hi=1, hi_open=True)
    eval_task_n: int = setting(0, help="--task: held-out problems solved greedily at each evaluation "
                               "(accuracy, format)", lo=0, integer=True)
    stop_at_accuracy: float | None = setting(
        None, help="--task: stop once the held-out accuracy reaches this (needs --eval-n, --eval-every)",
        lo=0, hi=1, lo_open=True, optional=True)
    merge: bool = setting(False, help="LoRA: also write the merged checkpoint into --out")
    vision: str | None = setting(None, help="add this vision tower (tiny-vl) to --model's language "
                                 "model: a DeepSeek-VL model trained on rows with images")
    train_vision: bool = setting(False, help="images: train the vision tower too (frozen by default)")
    tower_reading_steps: int = setting(
        0, help="images, --task: first teach the vision tower alone to transcribe the task's pictures "
        "for this many steps (a reading head on the tower; 0: no such stage unless --tower-reading-minutes)",
        lo=0, integer=True)
    tower_reading_minutes: float = setting(
        0.0, help="images, --task: the tower's reading stage for this many minutes (0: no time limit)", lo=0)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=sft_train_config)

    @property
    def tower_reading(self) -> bool:
        """Whether the run starts with the vision tower's reading stage."""
        return bool(self.tower_reading_steps or self.tower_reading_minutes)

    def validate(self) -> None:
        check_settings(self, "SFT")
        if bool(self.data) == bool(self.task):
            raise ValueError("give exactly one of --data FILE or --task NAME")
        if self.merge and not self.lora.enabled:
            raise ValueError("--merge merges LoRA adapters: give --lora")
        check_fp4_without_lora(self.lora, self.train)
        if self.eval_task_n and not self.task:
            raise ValueError("--eval-n measures a task's held-out accuracy: give --task")
        if self.stop_at_accuracy is not None and not (self.task and self.eval_task_n and self.train.eval_every):
            raise ValueError("--stop-at-accuracy needs --task, --eval-n > 0 and --eval-every > 0 "
                             "(the accuracy it stops on is measured at each evaluation)")
        if self.tower_reading and not self.task:
            raise ValueError("--tower-reading-steps/--tower-reading-minutes teach the vision tower on a "
                             "task's pictures and their transcriptions: give --task rendered_arithmetic")
        self.lora.validate()


def dpo_train_config(**kw) -> TrainConfig:
    """Small-model DPO defaults: batch = pairs per micro-batch; a gentle rate (the policy
    starts at the reference and β keeps it near)."""
    base = dict(max_steps=0, batch_size=8, seq_len=256, lr=1e-4, warmup_steps=5,
                weight_decay=0.0, eval_every=0, save_every=100, min_lr_ratio=0.1)
    return TrainConfig(**{**base, **kw})


@dataclass
class PairSampling:
    """--pairs-from-sampling: completions per prompt from the starting model."""
    prompts: int = setting(64, help="task prompts to sample on", lo=1, integer=True)
    samples: int = setting(4, help="completions per prompt", lo=2, integer=True)
    temperature: float = setting(1.0, help="sampling temperature", lo=0)
    max_tokens: int = setting(64, help="tokens per sampled completion", lo=1, integer=True)


@dataclass
class DPOConfig:
    init: str
    data: list[str] = setting(help="JSONL pairs: {\"prompt\" | \"messages\", \"chosen\", \"rejected\"} (repeat)",
                              default_factory=list)
    task: str | None = setting(None, help="sample pairs on this task (with --pairs-from-sampling)")
    task_options: dict = field(default_factory=dict)  # the task's options (--option digits=2)
    sampling: PairSampling = field(default_factory=PairSampling)
    beta: float = setting(0.1, help="DPO beta: how far the policy may move from the reference",
                          lo=0, lo_open=True)
    epochs: float = setting(3.0, help="passes over the pairs (sets --max-steps when not given)")
    merge: bool = setting(False, help="LoRA: also write the merged checkpoint into --out")
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=dpo_train_config)

    def validate(self) -> None:
        check_settings(self, "DPO")
        check_settings(self.sampling, "DPO sampling")
        if bool(self.data) == bool(self.task):
            raise ValueError("give exactly one of --data pairs.jsonl or --task NAME --pairs-from-sampling")
        if self.merge and not self.lora.enabled:
            raise ValueError("--merge merges LoRA adapters: give --lora")
        check_fp4_without_lora(self.lora, self.train)
        self.lora.validate()
