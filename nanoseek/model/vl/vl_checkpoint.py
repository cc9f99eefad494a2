"""DeepSeek-VL checkpoints both ways: transformers' saved names <-> the VL model's, with Llama's q/k rows put in nanoseek's RoPE pair order.

transformers' DeepseekVLForConditionalGeneration saves `model.vision_model.*` (SigLIP),
`model.aligner.*`, `model.language_model.*` (the text model without its head) and `lm_head.weight`,
which it leaves out when `tie_word_embeddings` (the default) ties it to `embed_tokens`. The
language model's names below `model.language_model.` are the text checkpoint's own (checkpoint/
names.py reads V2/V3's). A Llama text model rotates (i, i + d/2) inside each head, nanoseek
(2i, 2i + 1): q_proj and k_proj rows are permuted per head on load and back on save, which
changes no q·k. Tensors are read (and dequantised) by checkpoint/hf.py's reader.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.checkpoint import hf, names
from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.checkpoint.hf import CheckpointError
from nanoseek.config import ConfigError
from nanoseek.model.vl.vl_config import VLConfig

LM = "language_model."
HEAD = LM + "lm_head.weight"
EMBED = LM + "model.embed_tokens.weight"
_QK = re.compile(r"language_model\.model\.layers\.\d+\.self_attn\.[qk]_proj\.weight$")


def read_vl_config(path: Path) -> VLConfig:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json (is this a checkpoint directory?)")
    try:
        return VLConfig.from_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    except (ConfigError, ValueError) as e:
        raise CheckpointError(str(e)) from None


# ------------------------------------------------------------------------ names
def to_disk(name: str, cfg: VLConfig) -> str:
    """State-dict name -> the name transformers saves."""
    if name == HEAD:
        return "lm_head.weight"
    if name.startswith(LM + "model."):
        rel = names.to_disk(name.removeprefix(LM), cfg.text)  # model.layers.N.* (DeepseekV3 / Llama)
        return "model.language_model." + rel.removeprefix("model.")
    if name.startswith(("vision_model.", "aligner.")):
        return "model." + name
    raise CheckpointError(f"no DeepSeek-VL checkpoint name for tensor {name!r}")


def from_disk(name: str, t: torch.Tensor, cfg: VLConfig) -> list[tuple[str, torch.Tensor]]:
    """A saved tensor -> the (state-dict name, tensor) pairs it gives; unknown names are kept
    as they are (the loader reports them unexpected)."""
    if name == "lm_head.weight":
        return [(HEAD, t)]
    if name.startswith("model.language_model."):
        rel = "model." + name.removeprefix("model.language_model.")
        return [(LM + k, part) for k, part in names.from_disk_tensors(rel, t, cfg.text)]
    if name.startswith(("model.vision_model.", "model.aligner.")):
        return [(name.removeprefix("model."), t)]
    return [(name, t)]


# --------------------------------------------------------------- RoPE pair order
def half_to_pairs(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k rows of each head from Llama's order (x_0..x_{d/2-1}, then their partners) to
    nanoseek's, which keeps each rotated pair side by side: row 2i = i, row 2i+1 = i + d/2."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def pairs_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of half_to_pairs (what a Llama checkpoint stores)."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------- load
def load_vl(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device=None):
    """`cls` (DeepseekVLForConditionalGeneration) from a checkpoint directory: every tensor of
    the model must be there once with its shape (lm_head may be absent when tied)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    cfg = read_vl_config(path)
    weight_map = hf.checkpoint_files(path)
    with torch.device("meta"):
        model = cls(cfg)
    model.vision_model = cls.build_vision(cfg)  # real buffers (position ids), weights overwritten below
    expected = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for name, t, file in hf.read_tensors(path, weight_map):
        for key, part in from_disk(name, t, cfg):
            if key == HEAD and cfg.tie_word_embeddings:
                continue  # tied: transformers, too, takes embed_tokens
            if key not in expected:
                if part.numel() == 0:  # transformers' empty shared experts (n_shared_experts 0)
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {name!r} (not part of a DeepSeek-VL "
                                      "model with this config.json)")
            if key in loaded:
                raise CheckpointError(f"{file}: tensor {name!r} gives {key!r} twice")
            if tuple(part.shape) != tuple(expected[key].shape):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(part.shape)}, expected "
                                      f"{tuple(expected[key].shape)} from config.json")
            if cfg.rope_layout_permuted and _QK.match(key):
                part = half_to_pairs(part, cfg.text.qk_rope_head_dim)
            want = expected[key].dtype if not expected[key].is_floating_point() else (dtype or torch.float32)
            if hf.keep_fp32(key.removeprefix(LM)):
                want = torch.float32
            loaded[key] = part.to(device=device or "cpu", dtype=want)
    if cfg.tie_word_embeddings and EMBED in loaded:
        loaded[HEAD] = loaded[EMBED]
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{path}: tensor {to_disk(missing[0], cfg)!r} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(loaded, assign=True, strict=True)
    model.tie_weights()
    model.language_model.materialise_buffers(device)
    model.vision_model.to(device=device or "cpu")
    return model.eval()


# ------------------------------------------------------------------------- save
def vl_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' saved names (lm_head left out when tied)."""
    cfg: VLConfig = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == HEAD and cfg.tie_word_embeddings:
            continue
        t = t.detach()
        if cfg.rope_layout_permuted and _QK.match(name):
            t = pairs_to_half(t, cfg.text.qk_rope_head_dim)
        if dtype is not None and t.is_floating_point() and not hf.keep_fp32(name.removeprefix(LM)):
            t = t.to(dtype)
        out[to_disk(name, cfg)] = t.contiguous().clone()
    return out


def save_vl(model, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """config.json (the DeepSeek-VL dict the model was built from) + model.safetensors."""
    path = Path(path)
    tensors = vl_state_dict(model, dtype)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "model.safetensors",
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    index = path / hf.INDEX_FILE
    if index.exists():
        index.unlink()
    d = model.config.to_dict()
    d["dtype"] = str(dtype or model.aligner.linear1.weight.dtype).removeprefix("torch.")
    d.pop("torch_dtype", None)
    atomic_write_text(path / "config.json", json.dumps(d, indent=2, sort_keys=True) + "\n")
