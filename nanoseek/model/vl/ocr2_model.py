"""DeepSeek-OCR-2 in nanoseek: DeepEncoder V2 (model/vl/ocr2_vision.py), a linear projector, the
view separator, and nanoseek's own DeepSeekMoE transformer as the language model.

An image enters the prompt as one run of `<image>` placeholders that the vision tokens replace:
    [tile 1 | tile 2 | ... | tile n]  (144 tokens each, the tiles in row-major order)
    [global view]                     (256 tokens: the whole image padded to a square)
    [view separator]                  (one learned vector)
There are no newline tokens: DeepEncoder V2's queries already carry the 2-D layout (unlike
DeepSeek-OCR's, whose tokens are a raster with a newline per row). `encode_images` gives these
runs; `forward` takes the text ids and the runs and returns logits. Checkpoints read and write
DeepSeek's names (model/vl/ocr2_weights.py), so transformers' DeepseekOcr2ForConditionalGeneration
loads what nanoseek saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.checkpoint.atomic import atomic_write, atomic_write_text
from nanoseek.checkpoint.hf import checkpoint_files
from nanoseek.model.cache import Cache, ContiguousCache
from nanoseek.model.sampling import decode
from nanoseek.model.transformer import CausalLM
from nanoseek.model.vl import ocr2_weights
from nanoseek.model.vl.ocr2_config import ARCHITECTURE, OCR2Config, from_hf_json
from nanoseek.model.vl.ocr2_vision import DeepEncoderV2


class DeepseekOCR2(nn.Module):
    def __init__(self, cfg: OCR2Config):
        super().__init__()
        self.config = cfg
        self.vision = DeepEncoderV2(cfg.sam, cfg.encoder)
        self.projector = nn.Linear(cfg.vision_dim, cfg.text.hidden_size)
        self.view_separator = nn.Parameter(torch.zeros(cfg.text.hidden_size))
        self.language = CausalLM(cfg.text)

    @property
    def head_dim(self) -> int:
        return self.config.text.qk_rope_head_dim

    # ------------------------------------------------------------------ images
    def encode_images(self, pixel_values: torch.Tensor, pixel_values_local: torch.Tensor | None = None,
                      num_local_patches: list[int] | None = None) -> list[torch.Tensor]:
        """Global views [N, 3, S, S] and all tiles [sum(num_local_patches), 3, T, T] (the image
        processor's outputs) -> per image its vision tokens [n_i*144 + 256 + 1, hidden] in the
        prompt's layout: tiles, global view, view separator."""
        n = pixel_values.shape[0]
        counts = list(num_local_patches) if num_local_patches is not None else [0] * n
        if len(counts) != n:
            raise ValueError(f"num_local_patches has {len(counts)} entries for {n} images")
        if sum(counts) != (0 if pixel_values_local is None else pixel_values_local.shape[0]):
            raise ValueError(f"num_local_patches {counts} sums to {sum(counts)} tiles; pixel_values_local "
                             f"holds {0 if pixel_values_local is None else pixel_values_local.shape[0]}")
        dtype = next(self.vision.parameters()).dtype  # the processor's pixels are fp32; the tower may be bf16
        global_views = self.projector(self.vision(pixel_values.to(dtype)))
        tiles = (self.projector(self.vision(pixel_values_local.to(dtype))).split(counts)
                 if pixel_values_local is not None else [None] * n)
        sep = self.view_separator.to(global_views.dtype).unsqueeze(0)
        return [image_layout(t, g, sep) for t, g in zip(tiles, global_views)]

    # ------------------------------------------------------------------ text
    def embed(self, input_ids: torch.Tensor, image_tokens=None, text_only: bool = False) -> torch.Tensor:
        """Token embeddings with each `<image>` placeholder replaced by the next vision token
        (images in prompt order, row-major over the batch). text_only: every id is text, the
        placeholder id too (a decode step: a sampled placeholder id is a token like any other,
        as transformers' generate and the engine take it)."""
        x = self.language.model.embed_tokens(input_ids)
        if text_only:
            return x
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if image_tokens is None or (isinstance(image_tokens, list) and not image_tokens):
            if n_slots:
                raise ValueError(f"the prompt holds {n_slots} image placeholder tokens "
                                 f"(id {self.config.image_token_id}) and no image tokens were given")
            return x
        vis = torch.cat(list(image_tokens)) if isinstance(image_tokens, (list, tuple)) else image_tokens
        if vis.shape[0] != n_slots:
            raise ValueError(f"the prompt holds {n_slots} image placeholder tokens but the images give "
                             f"{vis.shape[0]} vision tokens")
        x = x.clone()
        x[slots] = vis.to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, image_tokens=None, positions: torch.Tensor | None = None,
                cache: Cache | None = None, text_only: bool = False) -> torch.Tensor:
        """Text ids [B, S] (with `<image>` placeholders) and the images' vision tokens
        (encode_images) -> logits [B, S, V]. text_only: see `embed`."""
        lm = self.language
        if positions is None:
            positions = lm.positions_for(input_ids, cache)
        freqs_cis = lm.rotary(positions)
        x = self.embed(input_ids, image_tokens, text_only)
        for layer in lm.model.layers:
            x = layer(x, freqs_cis, cache)
        return lm.lm_head(lm.model.norm(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, image_tokens=None, max_new_tokens: int = 16,
                 temperature: float = 0.0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompts of one length [B, S] (placeholders expanded) and their images' vision tokens
        -> [B, S + new]; greedy when temperature == 0. The images are read once, in the
        prefill; every later token attends over the cached keys and values."""
        B, S = input_ids.shape
        cache = ContiguousCache(B, S + max_new_tokens, absorb=False)
        logits = self(input_ids, image_tokens, cache=cache)[:, -1]
        return decode(input_ids, logits, lambda ids: self(ids, cache=cache, text_only=True)[:, -1],
                      max_new_tokens, temperature, 0, eos_token_id, generator)

    # ------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> DeepseekOCR2:
        """Read a DeepSeek-OCR-2 checkpoint directory (transformers- or nanoseek-written)."""
        path = Path(path)
        cfg = from_hf_json(json.loads((path / "config.json").read_text()))
        model = cls(cfg)
        ours = model.state_dict()
        by_disk = {ocr2_weights.to_disk(k): k for k in ours}
        weight_map = checkpoint_files(path)
        missing = sorted(set(by_disk) - set(weight_map))
        unexpected = sorted(set(weight_map) - set(by_disk))
        if missing or unexpected:
            raise ValueError(f"{path}: not this DeepSeek-OCR-2 config's weights: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{' ...' if len(unexpected) > 5 else ''}")
        loaded = {}
        for fname in sorted(set(weight_map.values())):
            for disk, t in load_file(str(path / fname)).items():
                name = by_disk[disk]
                if t.shape != ours[name].shape:
                    raise ValueError(f"{path / fname}: {disk} has shape {tuple(t.shape)}, the config "
                                     f"says {tuple(ours[name].shape)}")
                loaded[name] = ocr2_weights.from_disk_tensor(name, t, model.head_dim)
        model.load_state_dict(loaded)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """Write config.json and model.safetensors under DeepSeek's names (transformers reads them)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, t in self.state_dict().items():
            t = ocr2_weights.to_disk_tensor(name, t.detach(), self.head_dim)
            tensors[ocr2_weights.to_disk(name)] = (t.to(dtype) if dtype else t).contiguous().cpu()
        atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        raw = dict(self.config.raw, architectures=[ARCHITECTURE])
        if dtype is not None:
            raw["dtype"] = str(dtype).removeprefix("torch.")
        atomic_write_text(path / "config.json", json.dumps(raw, indent=2) + "\n")


def image_layout(tiles: torch.Tensor | None, global_view: torch.Tensor, separator: torch.Tensor) -> torch.Tensor:
    """One image's vision tokens in prompt order: every tile's queries, the global view's, then
    the view separator. tiles [n, 144, D] or None, global_view [256, D], separator [1, D]."""
    parts = [] if tiles is None else [tiles.reshape(-1, tiles.shape[-1])]
    return torch.cat(parts + [global_view, separator])
