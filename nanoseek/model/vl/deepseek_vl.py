"""DeepSeek-VL: transformers' SigLIP vision tower, DeepSeek's aligner, nanoseek's own language model.

The hybrid-free DeepSeek-VL (the form transformers' DeepseekVLForConditionalGeneration
builds): an image, resized and padded to a square, is cut into patches by SigLIP; the last
hidden states (one per patch) go through the vision-language adaptor, the *aligner*, a
two-layer MLP (Linear, GELU, Linear) into the language model's embedding space; those rows
take the places of the image's placeholder tokens (vl_layout.py) and the language model,
nanoseek's CausalLM (Llama-style dense MHA/GQA or DeepSeek-V2/V3), reads the sequence.

Interfaces an engine calls: `encode_images(pixel_values)` once per image,
`embed(input_ids, image_features, image_mask)` for a prompt (or a chunk of one), and
`forward(..., inputs_embeds=...)` with a cache like CausalLM's. Module names follow
transformers' in-memory ones under `vision_model`, `aligner`, `language_model` (the checkpoint
code, vl_checkpoint.py, maps them to the saved names).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from nanoseek.model.cache import Cache, ContiguousCache
from nanoseek.model.sampling import decode
from nanoseek.model.transformer import CausalLM
from nanoseek.model.vl.vl_config import VLConfig
from nanoseek.model.vl.vl_layout import ImageTokenError, image_token_mask, merge_image_features


class Aligner(nn.Module):
    """DeepSeek-VL's vision-language adaptor: vision width -> text width, Linear-GELU-Linear."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(vision_dim, text_dim)
        self.activation = nn.GELU()
        self.linear2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(x)))


def build_vision_tower(cfg: VLConfig) -> nn.Module:
    """transformers' SigLIP vision model, as DeepseekVLModel builds it (AutoModel.from_config)."""
    return AutoModel.from_config(cfg.vision)


class DeepseekVLForConditionalGeneration(nn.Module):
    build_vision = staticmethod(build_vision_tower)

    def __init__(self, cfg: VLConfig):
        super().__init__()
        if cfg.text.arch != "v3":
            raise ValueError(f"DeepSeek-VL's language model must be a V2/V3 or Llama-style model, "
                             f"got arch {cfg.text.arch!r}")
        self.config = cfg
        self.vision_model = self.build_vision(cfg)
        self.aligner = Aligner(cfg.vision.hidden_size, cfg.text.hidden_size)
        self.language_model = CausalLM(cfg.text)
        self.tie_weights()

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' weight when the config ties them (DeepseekVLConfig's default)."""
        if self.config.tie_word_embeddings:
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight

    def update_router_biases(self, gamma: float | None = None) -> None:
        """Training: the language model's aux-loss-free MoE bias update (the Trainer calls it)."""
        self.language_model.update_router_biases(gamma)

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None):
        """A transformers- or nanoseek-written DeepSeek-VL checkpoint directory."""
        from nanoseek.model.vl.vl_checkpoint import load_vl
        return load_vl(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors that transformers' DeepseekVL loads."""
        from nanoseek.model.vl.vl_checkpoint import save_vl
        save_vl(self, path, dtype=dtype)

    # ---------------------------------------------------------------------- images
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N,3,H,W] (the image processor's) -> image features [N, T, D_text]:
        SigLIP's last hidden state per patch, through the aligner."""
        if pixel_values.ndim != 4:
            raise ImageTokenError(f"pixel_values must be [N, 3, H, W], got {list(pixel_values.shape)}")
        dtype = self.aligner.linear1.weight.dtype
        hidden = self.vision_model(pixel_values.to(dtype)).last_hidden_state
        return self.aligner(hidden)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B,S] -> inputs_embeds [B,S,D], image placeholders replaced by the image
        feature rows ([N,T,D] or [K,D]; image_mask defaults to the placeholder tokens)."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_mask is None:
            image_mask = image_token_mask(input_ids, self.config.image_token_id)
        if image_features is None:
            if bool(image_mask.any()):
                raise ImageTokenError(f"{int(image_mask.sum())} image placeholder token(s) in the "
                                      "prompt but no image given")
            return embeds
        return merge_image_features(embeds, image_mask, image_features)

    # --------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        """Logits [B,S,V] from input_ids (+ pixel_values or precomputed image_features) or
        from inputs_embeds."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("give pixel_values or image_features, not both")
        if inputs_embeds is None:
            if pixel_values is not None:
                image_features = self.encode_images(pixel_values)
            inputs_embeds = self.embed(input_ids, image_features, image_mask)
        return self.language_model.lm_head(self.hidden(inputs_embeds, positions, cache))

    def hidden(self, inputs_embeds: torch.Tensor, positions: torch.Tensor | None = None,
               cache: Cache | None = None) -> torch.Tensor:
        """The language model's trunk from embeddings (CausalLM.trunk starts from ids)."""
        lm = self.language_model
        if positions is None:
            start = getattr(cache, "length", 0) if cache is not None else 0
            B, S = inputs_embeds.shape[:2]
            positions = torch.arange(start, start + S, device=inputs_embeds.device).expand(B, S)
        freqs_cis = lm.rotary(positions)
        x = inputs_embeds
        for layer in lm.model.layers:
            x = layer(x, freqs_cis, cache)
        return lm.model.norm(x)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 max_new_tokens: int = 16, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompts of one length [B,S] with their images -> [B, S + new] (greedy at
        temperature 0): the images are encoded once, at prefill."""
        B, S = input_ids.shape
        cache = ContiguousCache(B, S + max_new_tokens)
        cache.absorb = False
        logits = self(input_ids, pixel_values=pixel_values, cache=cache)[:, -1]
        cache.absorb = True

        def step(ids):  # a sampled placeholder id is text here: no image follows the prompt
            return self(ids, image_mask=torch.zeros_like(ids, dtype=torch.bool), cache=cache)[:, -1]
        return decode(input_ids, logits, step, max_new_tokens, temperature, 0, eos_token_id, generator)
