"""DeepSeek-VL's image-token layout: each image is a run of placeholder tokens in the prompt, and its aligned patch embeddings replace them in order.

DeepSeek-VL (Lu et al., 2024, §3.1) feeds the language model one sequence: text embeddings
with, where an image stands, the image's vision tokens (one per SigLIP patch, after the
aligner). The prompt spells an image as `<image_placeholder>` repeated `image_tokens` times
(the processor expands one placeholder into the run); the k-th placeholder token of the
batch, read row by row, takes the k-th feature row of the images, taken in order. Nothing
else marks an image: its positions are ordinary consecutive RoPE positions.
"""

from __future__ import annotations

import torch


class ImageTokenError(ValueError):
    """Placeholder tokens and image features do not match one for one."""


def expand_image_placeholders(ids: list[int], image_token_id: int, image_tokens: int) -> list[int]:
    """A prompt with one placeholder per image -> the run of `image_tokens` placeholders each
    image takes (what DeepseekVLProcessor does to the text before tokenising)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * image_tokens if t == image_token_id else [t])
    return out


def image_token_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B,S] bool: the positions whose embedding an image feature replaces."""
    return input_ids == image_token_id


def flatten_features(image_features: torch.Tensor, dim: int) -> torch.Tensor:
    """Image features [N_images, T, D] (or already [K, D]) -> rows [K, D] in reading order."""
    if image_features.ndim not in (2, 3) or image_features.shape[-1] != dim:
        raise ImageTokenError(f"image features must be [N, T, {dim}] or [K, {dim}], got "
                              f"{list(image_features.shape)}")
    return image_features.reshape(-1, dim)


def merge_image_features(embeds: torch.Tensor, image_mask: torch.Tensor,
                         image_features: torch.Tensor) -> torch.Tensor:
    """Text embeddings [B,S,D] with the rows `image_mask` [B,S] selects replaced, in reading
    order, by the feature rows [K,D] (K must equal the mask's count: a chunk of a prompt
    passes the rows of the image tokens it holds). Returns a new tensor."""
    rows = flatten_features(image_features, embeds.shape[-1])
    n_tokens = int(image_mask.sum())
    if n_tokens != rows.shape[0]:
        raise ImageTokenError(f"{n_tokens} image placeholder token(s) in the prompt but "
                              f"{rows.shape[0]} image feature row(s) given")
    if image_mask.shape != embeds.shape[:2]:
        raise ImageTokenError(f"image_mask {list(image_mask.shape)} does not match the tokens "
                              f"{list(embeds.shape[:2])}")
    return embeds.masked_scatter(image_mask.unsqueeze(-1), rows.to(embeds.dtype))
