"""LoRA adapters on nanoseek's linears, through `peft`, in peft's own file format.

W x + (α/r) B A x with A [r, in] and B [out, r] (B starts at zero, so training starts from
the base model exactly) on the projections a DeepSeek block has: MLA's q_a_proj / q_b_proj
(or q_proj), kv_a_proj_with_mqa, kv_b_proj, o_proj, and every expert's, shared expert's and
dense FFN's gate/up/down_proj (the MTP modules' too). The router (`Gate`, not a Linear),
the embeddings and the head stay frozen.

peft wraps any nn.Module: `get_peft_model` finds the targets by name and injects
`lora.Linear` layers (or its bitsandbytes 4-bit variant over an NF4 base, see qlora.py);
the wrapper forwards every other attribute (`loss`, `generate`, `config`) to the CausalLM.
`save_adapter` writes `adapter_config.json` + `adapter_model.safetensors`, which
`PeftModel.from_pretrained` (and `load_adapter` here) reads back; `merge_lora` folds
B A into W for a plain checkpoint that the engine serves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from nanoseek.train.posttrain.settings import LORA_TARGETS, LoraSettings  # noqa: F401 (re-exported)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_DIR = "adapter"  # where a LoRA run keeps them, inside its run directory


def target_names(model: nn.Module, targets) -> list[str]:
    """Full names of the linears LoRA wraps (by the last part of their name)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in set(targets)]


def add_lora(model: nn.Module, settings: LoraSettings):
    """The model with trainable adapters on its targeted linears and everything else frozen."""
    from peft import LoraConfig, get_peft_model

    present = sorted({n.rsplit(".", 1)[-1] for n in target_names(model, settings.targets)})
    if not present:
        raise ValueError(f"--lora-targets {settings.targets}: none of these linears is in the model")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=present, bias="none")
    return get_peft_model(mark_4bit(model), config)


def mark_4bit(model: nn.Module) -> nn.Module:
    """Flag a model holding bitsandbytes 4-bit linears (a QLoRA base) as transformers does,
    so that peft wraps them in its 4-bit LoRA layer, whose merge dequantises, adds B A and
    quantises again; its plain layer would add B A to the packed 4-bit codes and fail."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit linear can exist
    if bnb is not None and any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        model.is_loaded_in_4bit = True
    return model


def save_adapter(peft_model, out_dir: str | Path) -> None:
    """peft's format; the README peft writes beside it is dropped (it says nothing here)."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)


def load_adapter(base: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """A base CausalLM with the adapter of `adapter_dir` attached."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_FILES[0]).exists() and (adapter_dir / ADAPTER_DIR).is_dir():
        adapter_dir = adapter_dir / ADAPTER_DIR  # a LoRA run directory
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).exists():
            raise FileNotFoundError(f"{adapter_dir}: no {name} (not a LoRA adapter directory)")
    return PeftModel.from_pretrained(mark_4bit(base), str(adapter_dir), is_trainable=trainable)


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapter into the fp32 base weights (W + α/r B A) and write a plain
    checkpoint with the base's tokenizer: what `nanoseek generate` and the server load.
    A QLoRA adapter is merged into the full-precision weights its 4-bit base was quantised
    from (W + B A, where training saw Ŵ + B A: the logits then differ from the adapter
    model's by about the NF4 base's own error; `qlora.merge_dequantized` gives Ŵ + B A)."""
    from nanoseek.checkpoint.hf import save_pretrained
    from nanoseek.model import CausalLM
    from nanoseek.text.tokenizer import copy_tokenizer

    merged = load_adapter(CausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    save_pretrained(merged, out_dir)
    copy_tokenizer(base_dir, out_dir)
    return Path(out_dir)
