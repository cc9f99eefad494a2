"""Which vision-language class loads a checkpoint directory, by the architecture its config.json names (nanoseek.from_pretrained and the engine ask)."""

from __future__ import annotations

import os

from nanoseek.checkpoint.hf import vision_checkpoint
from nanoseek.model.transformer import CausalLM
from nanoseek.model.vl.deepseek_vl import DeepseekVLForConditionalGeneration
from nanoseek.model.vl.ocr2_model import DeepseekOCR2

# config.json's architecture -> the class that loads it (checkpoint/hf.py lists the names)
VISION_CLASSES = {"DeepseekVLForConditionalGeneration": DeepseekVLForConditionalGeneration,
                  "DeepseekOcr2ForConditionalGeneration": DeepseekOCR2}


def vision_class(path: str | os.PathLike):
    """The vision-language class a checkpoint directory's config.json names, or None (a text
    model, or no readable config.json: the text loader then says what is wrong)."""
    arch = vision_checkpoint(path)
    if arch is not None and arch not in VISION_CLASSES:
        raise ValueError(f"{path}: {arch} checkpoints are not built by nanoseek")
    return VISION_CLASSES.get(arch)


def language_model(model) -> CausalLM:
    """A vision-language model's language model (the CausalLM among its parts): what serves
    text-only prompts."""
    lm = next((m for m in model.children() if isinstance(m, CausalLM)), None)
    if lm is None:
        raise ValueError(f"{type(model).__name__} has no nanoseek CausalLM among its parts")
    return lm
