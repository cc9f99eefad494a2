"""DeepSeek-OCR-2's weight names: nanoseek's modules <-> DeepSeek's names (the ones transformers
writes back with save_pretrained and reads with its conversion mapping), and the rope layout.

The language side keeps DeepseekV2's names (`model.layers.N.*`, `lm_head`); the vision side is
stored under DeepSeek's original modules (`model.sam_model.*` for SAM and its compressor,
`model.qwen2_model.*` for the causal-flow encoder, `model.projector.layers`, and the separator
spelled `model.view_seperator`). transformers' text attention rotates halves of each head
(rotate_half); nanoseek's rotates consecutive pairs, so q_proj and k_proj rows are permuted per
head on the way in (half -> pairs) and back on the way out; q·k is unchanged.
"""

from __future__ import annotations

import re

import torch

SAM_RENAMES = [  # inside the SAM encoder: transformers' module names -> DeepSeek's
    (r"layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"layers\.(\d+)\.", r"blocks.\1."),
    (r"patch_embed\.projection\.", "patch_embed.proj."),
    (r"neck\.conv1\.", "neck.0."), (r"neck\.layer_norm1\.", "neck.1."),
    (r"neck\.conv2\.", "neck.2."), (r"neck\.layer_norm2\.", "neck.3."),
    (r"proj\.conv1\.", "net_2."), (r"proj\.conv2\.", "net_3."),  # the 16x token compressor
]
PREFIXES = [  # nanoseek module prefix -> DeepSeek's, most specific first
    ("vision.sam_encoder.", "model.sam_model."),
    ("vision.encoder.layers.", "model.qwen2_model.model.model.layers."),
    ("vision.encoder.norm.", "model.qwen2_model.model.model.norm."),
    ("vision.encoder.query_768.", "model.qwen2_model.query_768."),
    ("vision.encoder.query_1024.", "model.qwen2_model.query_1024."),
    ("projector.", "model.projector.layers."),
    ("view_separator", "model.view_seperator"),
    ("language.lm_head.", "lm_head."),
    ("language.model.", "model."),
]
ROPE_ROWS = re.compile(r"^language\.model\.layers\.\d+\.self_attn\.[qk]_proj\.weight$")


def to_disk(name: str) -> str:
    """A nanoseek state-dict name -> its name in a DeepSeek-OCR-2 checkpoint."""
    for ours, theirs in PREFIXES:
        if name.startswith(ours):
            rest = name[len(ours):]
            if ours == "vision.sam_encoder.":
                for pattern, repl in SAM_RENAMES:
                    rest = re.sub("^" + pattern, repl, rest)
            return theirs + rest
    raise KeyError(f"{name!r}: no DeepSeek-OCR-2 checkpoint name for this parameter")


def half_to_pairs(head_dim: int) -> torch.Tensor:
    """Row order that turns the halves layout (x_i pairs with x_{i+d/2}) into consecutive pairs."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)


def permute_rope_rows(w: torch.Tensor, head_dim: int, inverse: bool = False) -> torch.Tensor:
    """q/k projection rows [H*d, D], permuted per head: halves -> pairs, or back (inverse)."""
    perm = half_to_pairs(head_dim)
    if inverse:
        perm = perm.argsort()
    return w.view(-1, head_dim, w.shape[-1])[:, perm].reshape(w.shape).contiguous()


def from_disk_tensor(name: str, t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A checkpoint tensor as the nanoseek parameter `name` holds it."""
    return permute_rope_rows(t, head_dim) if ROPE_ROWS.match(name) else t


def to_disk_tensor(name: str, t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A nanoseek parameter as the checkpoint stores it."""
    return permute_rope_rows(t, head_dim, inverse=True) if ROPE_ROWS.match(name) else t
