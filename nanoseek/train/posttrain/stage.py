"""What the post-training stages (SFT, DPO) share: the model they start from, LoRA/QLoRA on
top of it, what a checkpoint of theirs is, and their run directory's settings.

A stage starts from `--model DIR`, a checkpoint with its tokenizer (a pretraining run, an
SFT run...). Full fine-tuning trains every weight and saves a plain checkpoint; with LoRA
the base stays frozen and the run directory holds peft's adapter files in `adapter/` (and,
with `merge`, the merged checkpoint beside it: a separate folder, since loaders that read
every *.safetensors of a checkpoint, nanoseek's and vLLM's, must not meet the adapter's). Either way the tokenizer is copied in, so
`nanoseek generate OUT` and `LLM(OUT)` load a merged or full run directly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from nanoseek.train.run.run_dir import entries, listing
from nanoseek.train.run.train_state import STATE_FILE
from nanoseek.train.config import settings_from_dict, settings_to_dict
from nanoseek.train.posttrain.lora import ADAPTER_DIR, LoraSettings, add_lora, save_adapter
from nanoseek.train.pretrain import RunError


def load_init(init: str | Path, device: torch.device):
    """The starting checkpoint (fp32) and its tokenizer."""
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import load_tokenizer

    init = Path(init)
    if not (init / "tokenizer.json").exists():
        raise RunError(f"--model {init}: no tokenizer.json; post-training needs the tokenizer the "
                       "model was trained with (a pretraining run directory has one)")
    model = CausalLM.from_pretrained(init, dtype=torch.float32, device=device)
    return model, load_tokenizer(init)


def with_adapters(model, lora: LoraSettings, probe: torch.Tensor, log=print):
    """model as is (full fine-tuning), or frozen with LoRA adapters; with QLoRA its targeted
    linears first go to NF4 (memory saved and the logits error are logged and returned)."""
    if not lora.enabled:
        return model, None
    report = None
    total = sum(p.numel() for p in model.parameters())  # before 4-bit packing halves numel
    if lora.qlora:
        from nanoseek.train.posttrain.qlora import logits_error, quantize_base
        reference = copy.deepcopy(model).eval()
        report = quantize_base(model, lora.targets)
        report.logits_max_abs_error, report.logits_rel_error = logits_error(reference, model.eval(), probe)
        del reference
        log(report.describe())
    model = add_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={lora.r} alpha={lora.alpha:g} on {', '.join(sorted(model.peft_config['default'].target_modules))}: "
        f"{trainable:,} trainable parameters ({trainable / total:.1%} of the model's {total:,})")
    return model, report


def base_model(model):
    """The CausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_writer(out_dir: Path, init: str | Path, lora: LoraSettings):
    """on_checkpoint for the Trainer: the full model, or the adapter, plus the tokenizer."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.text.tokenizer import copy_tokenizer

    def write(model, step: int) -> None:
        if lora.enabled:
            save_adapter(model, out_dir / ADAPTER_DIR)
        else:
            save_pretrained(model, out_dir)
        copy_tokenizer(init, out_dir)
    return write


def merge_into(out_dir: Path, init: str | Path) -> None:
    """Merge the run's adapter into the fp32 init and write it into the run directory."""
    from nanoseek.train.posttrain.lora import merge_lora
    merge_lora(init, out_dir / ADAPTER_DIR, out_dir)


def holds_run(out_dir: Path) -> bool:
    """Whether `out_dir` holds a checkpoint to resume: train_state.pt, or the sharded
    checkpoint of a run on several processes."""
    from nanoseek.parallel import sharded_state as sharded
    return (out_dir / STATE_FILE).exists() or sharded.exists(out_dir)


def stage_settings(out_dir: Path, config, resume: bool, max_steps: int | None):
    """A new run's settings are `config`; a resumed run's are those saved in its run.json
    (with max_steps replaced when given). Nothing a user saved is written over: not the
    --model directory, not a directory holding files of no nanoseek run."""
    init = getattr(config, "init", None)
    if init is not None and Path(init).exists() and Path(out_dir).resolve() == Path(init).resolve():
        raise RunError(f"--out {out_dir} is the --model directory: the run would write over the model it "
                       "starts from; choose another --out")
    if holds_run(out_dir) and not resume:
        raise RunError(f"{out_dir} already holds a run; pass --resume to continue it or choose "
                       "another --out")
    run_file = out_dir / "run.json"
    names = entries(out_dir)
    if names and not holds_run(out_dir) and not run_file.exists():  # e.g. a saved model: never written over
        raise RunError(f"--out {out_dir} is not empty and holds no nanoseek run{' to resume' if resume else ''} "
                       f"(it holds {listing(names)}); the run's checkpoint would overwrite these files: "
                       "choose another --out")
    if not resume or not run_file.exists():
        return config
    saved = settings_from_dict(type(config), json.loads(run_file.read_text())["settings"], str(run_file))
    if max_steps:
        saved.train.max_steps = max_steps
    return saved


def start_stage(out_dir: Path, config, resume: bool, max_steps: int | None, device=None):
    """What every post-training stage does first: its settings (the saved ones on resume),
    checked, and the init model with its tokenizer on `device` (default: the default
    device; under torchrun, the rank's), the window length checked against the model's
    context. Returns (config, device, model, tokenizer)."""
    from nanoseek.train.pretrain import default_device
    config = stage_settings(out_dir, config, resume, max_steps)
    config.validate()
    device = device or default_device()
    model, tok = load_init(config.init, device)
    if config.train.seq_len > model.config.max_position_embeddings:
        raise RunError(f"--seq-len {config.train.seq_len} exceeds the model's context "
                       f"({model.config.max_position_embeddings})")
    return config, device, model, tok


def write_run(out_dir: Path, settings, **facts) -> dict:
    """run.json's content; written by rank 0 alone under torchrun (the others return it)."""
    from nanoseek.parallel.launch import is_main
    from nanoseek.train.pretrain import write_run as write
    run = {"stage": type(settings).__name__.removesuffix("Config").lower(),
           "settings": settings_to_dict(settings), **facts}
    if is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        write(out_dir, run)
    return run


def data_parallel(model, layout, device, batch_size: int, what: str):
    """The `Parallel` of a post-training stage under torchrun (layout: a ParallelConfig,
    default pure DP); `batch_size` rows per step are split over its DP ranks."""
    from nanoseek.parallel import ParallelConfig
    from nanoseek.parallel.runtime import Parallel
    par = Parallel(model, layout or ParallelConfig(), device)
    if batch_size % par.dp:
        raise ValueError(f"{what}: {batch_size} cannot be split over {par.dp} data-parallel "
                         f"ranks (use a multiple of {par.dp})")
    return par


def load_task_lazily(name: str, **options):
    """`--task T`: the tasks package is imported only when a task is asked for."""
    from nanoseek.data.tasks import load_task
    return load_task(name, **options)


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) of SFT's conversations (text or with images); the held-out share is
    drawn with the run's seed."""
    n_val = int(len(items) * val_fraction)
    if n_val == 0:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]
