"""Supervised fine-tuning of a DeepSeek-VL model: conversations with images, the loss on the assistant's tokens, the vision tower frozen unless `--train-vision`.

`nanoseek sft` runs this stage when `--model` is a DeepSeek-VL checkpoint, or when `--vision
tiny-vl` asks for one built on `--model`'s language model (model/vl/vl_build.py). The data
are chat rows whose user content holds `image_url` parts, or a task whose prompts carry a
picture (rendered_arithmetic); data/chat_images.py renders them with the placeholder runs
the engine and the server use, and keeps each window's images with it.

What trains follows DeepSeek-VL's later stages (Lu et al., 2024, §3.2: the adaptor and the
language model learn, the SigLIP encoder stays as it is): the aligner and the language
model; the tower only with `--train-vision`. A frozen tower gets no gradient and is not in
the optimizer, so its weights leave the run bit for bit as they came. The objective is
text SFT's next-token cross-entropy over the assistant's tokens (summed, divided by the
step's count of them) plus the MoE balance term; the VL language model has no MTP heads.
LoRA (peft) is refused here: its adapters wrap nanoseek's CausalLM, and a VL run trains
full weights. run.json and the log list the trainable parameters per part.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.train.loop import Trainer
from nanoseek.train.posttrain.stage import load_init, load_task_lazily, split, stage_settings, write_run
from nanoseek.train.pretrain import RunError

PARTS = {"vision": "vision_model", "aligner": "aligner", "language": "language_model"}
LOSS_WINDOWS = 128  # training windows the before/after loss reads when nothing is held out (as sft.py)


class VisionSFTError(ValueError):
    """An SFT run with images that cannot go ahead (model, data or options)."""


# --------------------------------------------------------------------------- the model
def vision_checkpoint_of(init: str | Path) -> bool:
    """Whether `init` is a DeepSeek-VL checkpoint (DeepSeek-OCR-2 is refused by name)."""
    from nanoseek.checkpoint.hf import vision_checkpoint
    arch = vision_checkpoint(init)
    if arch == "DeepseekOcr2ForConditionalGeneration":
        raise VisionSFTError(f"--model {init}: DeepSeek-OCR-2 checkpoints are not fine-tuned by "
                             "nanoseek sft (DeepSeek-VL checkpoints are)")
    return arch == "DeepseekVLForConditionalGeneration"


def is_vision_run(config) -> bool:
    return bool(config.vision) or vision_checkpoint_of(config.init)


def load_vision_model(config, device):
    """(DeepSeek-VL model fp32, tokenizer): the checkpoint itself, or `config.vision`'s tower
    around the text checkpoint's language model."""
    from nanoseek.text.tokenizer import load_tokenizer
    init = Path(config.init)
    if config.vision:
        from nanoseek.model.vl.vl_build import VisionBuildError, vl_from_text
        if vision_checkpoint_of(init):
            raise VisionSFTError(f"--vision {config.vision}: --model {init} already is a vision-language "
                                 "model; drop --vision")
        text, tok = load_init(init, device)
        try:
            model, tok = vl_from_text(text, tok, config.vision, seed=config.train.seed)
        except VisionBuildError as e:
            raise VisionSFTError(f"--vision {config.vision}: {e}") from None
        return model.to(device), tok
    if not (init / "tokenizer.json").exists():
        raise RunError(f"--model {init}: no tokenizer.json; post-training needs the tokenizer the "
                       "model was trained with")
    from nanoseek.model.vl import DeepseekVLForConditionalGeneration
    model = DeepseekVLForConditionalGeneration.from_pretrained(init, dtype=torch.float32, device=device)
    return model, load_tokenizer(init)


def freeze(model, train_vision: bool) -> dict[str, int]:
    """The vision tower trains only with `train_vision`; returns trainable parameters per part.
    SigLIP's pooling head stays frozen either way: DeepSeek-VL reads the patch features, never
    the pooled output, so no gradient reaches it (it is kept for the checkpoint's sake)."""
    model.vision_model.requires_grad_(train_vision)
    pooling_head = getattr(model.vision_model, "head", None)  # SiglipVisionModel's, when vision_use_head
    if pooling_head is not None:
        pooling_head.requires_grad_(False)
    return trainable_counts(model)


def tower_reading_stage(model, config, out_dir: Path, resume: bool, log) -> dict | None:
    """The tower's reading stage (tower_reading.py) when asked for; a resumed run's tower
    comes from its checkpoint instead. Returns the stage's record, or None."""
    if not config.tower_reading:
        return None
    from nanoseek.train.run.train_state import STATE_FILE
    if resume and (out_dir / STATE_FILE).exists():
        log("tower reading: resumed run, the tower comes from its checkpoint")
        from nanoseek.train.run.run_dir import read_run_json
        return (read_run_json(out_dir) or {}).get("tower_reading")
    from nanoseek.model.vl.vl_image import image_processor
    from nanoseek.train.posttrain.tower_reading import TowerReadingError, teach_tower_to_read
    task = load_task_lazily(config.task, **config.task_options)
    processor = image_processor(config.init if not config.vision else None, model.config.vision.image_size)
    try:
        return teach_tower_to_read(model.vision_model, task, processor, steps=config.tower_reading_steps,
                                   minutes=config.tower_reading_minutes, seed=config.train.seed, log=log)
    except TowerReadingError as e:
        raise VisionSFTError(f"--tower-reading: {e}") from None


def trainable_counts(model) -> dict[str, int]:
    """Trainable parameters of each part (vision tower, aligner, language model)."""
    return {part: sum(p.numel() for p in getattr(model, attr).parameters() if p.requires_grad)
            for part, attr in PARTS.items()}


# ---------------------------------------------------------------------------- the data
def conversations(config):
    """The run's conversations with their sources: JSONL rows or a task's demonstrations."""
    from nanoseek.data.chat_images import ImageConversation, read_image_conversations
    if config.data:
        return read_image_conversations(config.data)
    task = load_task_lazily(config.task, **config.task_options)
    examples = task.examples("train", config.task_examples, config.train.seed)
    return [ImageConversation(task.messages(ex), f"task {config.task} example {i}")
            for i, ex in enumerate(examples)]


def refuse_images_for_text_model(config) -> None:
    """A text-only `--model` given rows with images (or --train-vision): one error naming the
    first such row and what to do instead."""
    from nanoseek.data.chat_images import first_image_row
    if config.tower_reading:
        raise VisionSFTError(f"--tower-reading-steps/--tower-reading-minutes: --model {config.init} is a "
                             "text-only model (no vision tower); add one with --vision tiny-vl")
    if config.train_vision:
        raise VisionSFTError(f"--train-vision: --model {config.init} is a text-only model (no vision "
                             "tower); give a DeepSeek-VL checkpoint or add one with --vision tiny-vl")
    if config.data:
        row = first_image_row(conversations(config))
        if row is not None:
            raise VisionSFTError(f"{row.where}: the row holds an image (an image_url part), but --model "
                                 f"{config.init} is a text-only model; give a DeepSeek-VL checkpoint "
                                 "or add a vision tower with --vision tiny-vl")
    elif config.task == "rendered_arithmetic":
        raise VisionSFTError(f"--task rendered_arithmetic: each prompt holds an image, but --model "
                             f"{config.init} is a text-only model; give a vision-language model (a "
                             "DeepSeek-VL checkpoint) or add a vision tower with --vision tiny-vl")


def windows_of(convs, model, tok, config):
    from nanoseek.data.chat_images import image_windows
    from nanoseek.model.vl.vl_image import image_processor
    cfg = model.config
    size = cfg.vision.image_size
    return image_windows(convs, tok, config.train.seq_len, cfg.image_token_id, cfg.image_tokens,
                         image_processor(config.init if not config.vision else None, size), size,
                         config.packing)


# --------------------------------------------------------------------------- the loss
def vl_loss(model, batch, targets):
    """Next-token CE over the assistant's tokens (their sum over the step's count) + the
    MoE balance term as this micro-batch's share; logs lm_loss and aux_loss."""
    x, y, px = batch
    logits = model(x, pixel_values=px if len(px) else None)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="sum")
    lm_loss = ce / targets.count[0].clamp(min=1)
    aux = [m.aux_loss for m in model.language_model.moe_layers() if m.aux_loss is not None]
    aux_loss = torch.stack(aux).sum() / targets.micro_batches if aux else None
    loss = lm_loss if aux_loss is None else lm_loss + aux_loss
    return loss, {"lm_loss": lm_loss, "aux_loss": aux_loss}


def count_targets(batch) -> torch.Tensor:
    return (batch[1] != IGNORE_INDEX).sum().reshape(1)


@torch.no_grad()
def masked_loss(model, windows, batch_size: int, device, limit: int | None = None) -> float:
    """Mean CE over the assistant tokens of the first `limit` windows (all if None)."""
    model.eval()
    total, count = 0.0, 0
    n = min(len(windows), limit or len(windows))
    for i in range(0, n, batch_size):
        x, y, px = (t.to(device) for t in windows.take(list(range(i, min(i + batch_size, n)))))
        logits = model(x, pixel_values=px if len(px) else None)
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((y != IGNORE_INDEX).sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------- the stage
def vision_sft(out_dir: Path, config, resume: bool, max_steps: int | None, progress: bool, log,
               rank_device, adapt_threads: bool = False) -> dict:
    """Run (or resume) SFT with images into `out_dir`; returns run.json's content."""
    from nanoseek.text.tokenizer import save_tokenizer
    from nanoseek.train.pretrain import default_device
    if rank_device is not None:
        raise VisionSFTError("SFT with images runs on one process: drop --nproc")
    config = stage_settings(out_dir, config, resume, max_steps)
    config.validate()
    if config.lora.enabled:
        raise VisionSFTError("--lora/--qlora with a vision-language model is not supported (peft's "
                             "adapters wrap the text CausalLM): fine-tune every weight, with the "
                             "vision tower frozen unless --train-vision")
    if config.eval_task_n:
        raise VisionSFTError("--eval-n (task accuracy through the engine) is not supported with images "
                             "yet; measure it afterwards (benchmarks/bench_vision.py)")
    device = default_device()
    model, tok = load_vision_model(config, device)
    if config.train.seq_len > model.config.text.max_position_embeddings:
        raise RunError(f"--seq-len {config.train.seq_len} exceeds the model's context "
                       f"({model.config.text.max_position_embeddings})")
    train_convs, val_convs = split(conversations(config), config.val_fraction, config.train.seed)
    data = windows_of(train_convs, model, tok, config)  # bad rows are refused before any training
    val = windows_of(val_convs, model, tok, config) if val_convs else None
    reading = tower_reading_stage(model, config, out_dir, resume, log)
    trainable = freeze(model, config.train_vision)
    if not config.train.max_steps:
        t = config.train
        config.train.max_steps = max(1, math.ceil(config.epochs * len(data) / (t.batch_size * t.grad_accum)))
    torch.manual_seed(config.train.seed)
    trainer = build_trainer(model, tok, config, data, val, out_dir, progress, adapt_threads, device)
    limit = None if config.val_fraction else LOSS_WINDOWS
    before = masked_loss(model, val or data, config.train.batch_size, device, limit)
    if resume and trainer.resume():
        log(f"resumed at step {trainer.step}")
    log(f"SFT with images: {data.meta['conversations']} conversations ({data.meta['images']} images of "
        f"{data.meta['image_tokens']} tokens) in {len(data)} windows of {config.train.seq_len}, "
        f"{config.train.max_steps} steps; trainable parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in trainable.items())
        + f"; loss on assistant tokens {before:.4f}")
    run = write_run(out_dir, config, data=data.meta, loss_before=before, trainable_parameters=trainable,
                    **({"tower_reading": reading} if reading else {}),
                    precision=trainer.precision, precision_reason=trainer.precision_reason)
    save_tokenizer(tok, out_dir)
    run["summary"] = trainer.fit()
    run["loss_after"] = masked_loss(model, val or data, config.train.batch_size, device, limit)
    log(f"loss on assistant tokens: {before:.4f} -> {run['loss_after']:.4f}")
    write_run(out_dir, config, **{k: v for k, v in run.items() if k not in ("stage", "settings")})
    return run


def build_trainer(model, tok, config, data, val, out_dir: Path, progress: bool, adapt_threads: bool,
                  device) -> Trainer:
    t = config.train

    def next_batch(step, micro):
        return tuple(x.to(device) for x in data.batch(step * t.grad_accum + micro, t.batch_size, t.seed))

    def evaluate(m):
        return {"val_loss": masked_loss(model, val, t.batch_size, device)}

    def write(m, step):  # the checkpoint, and the image processor its pixels came from
        m.save_pretrained(out_dir)
        data.processor.save_pretrained(out_dir)

    return Trainer(model, t, out_dir, next_batch, vl_loss, count_targets=count_targets,
                   evaluate=evaluate if val else None, on_checkpoint=write, progress=progress,
                   adapt_threads=adapt_threads)
