"""DeepSeek-OCR-2's images in engine requests: tiles, global view and view separator, encoded once per image per request.

The engine side of `model/vl/ocr2_model.DeepseekOCR2`, with `VisionPrompts`'s life cycle
(engine/vision.py): each image becomes a `PromptImage` at admission, is encoded by the first
prefill chunk that reads it (the images of the whole batch in one call of DeepEncoder V2),
its rows are spliced into every chunk that covers them, and it is keyed in the prefix cache
by its content hash. What differs is the layout: an image's vision tokens are
    144 per tile · n tiles + 256 (global view) + 1 (view separator)
at the published sizes, and n depends on the image's aspect ratio (OCR2ImageProcessor's
tiling), so the number of placeholders an image takes is known only once it is
preprocessed; a prompt with one placeholder per image has each expanded to its own count.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nanoseek.engine.vision import PromptImage, VisionPrompts, image_hash
from nanoseek.model.vl.ocr2_model import DeepseekOCR2
from nanoseek.model.vl.ocr2_processor import OCR2ImageProcessor
from nanoseek.model.vl.vl_layout import ImageTokenError

MAX_IMAGES = 16  # per request: each is 257 + 144 · tiles vision tokens at the published sizes


def default_processor(model: DeepseekOCR2) -> OCR2ImageProcessor:
    """The processor a checkpoint's SAM sizes imply: the global view at SAM's image_size, tiles
    at 3/4 of it (1024 and 768 published: 256 and 144 queries), patch_size SAM's."""
    size, patch = model.config.sam["image_size"], model.config.sam["patch_size"]
    return OCR2ImageProcessor(size=size, tile_size=size * 3 // 4, patch_size=patch)


class OCR2Prompts(VisionPrompts):
    """(ids, images) -> a prompt with `PromptImage`s whose `tiles` hold the image's tiles;
    a batch of prefill chunks -> input embeddings, as VisionPrompts does for DeepSeek-VL."""

    def __init__(self, model: DeepseekOCR2, processor: OCR2ImageProcessor | None = None):
        if not isinstance(model, DeepseekOCR2):
            raise ValueError(f"OCR2Prompts serves DeepSeek-OCR-2 models, not {type(model).__name__}")
        self.model = model
        self.image_token_id = model.config.image_token_id
        self.processor = processor or default_processor(model)
        self.tokens_per_image = None  # depends on each image's tiles: `image_tokens`
        self.encoded = 0

    def image_tokens(self, images) -> list[int]:
        """Vision tokens of each image (its tiles, global view and separator)."""
        return [self._tokens(im) for im in self.images(images)]

    def _tokens(self, im: PromptImage) -> int:
        return self.processor.num_image_tokens(0 if im.tiles is None else im.tiles.shape[0])

    # ------------------------------------------------------------- admission
    def prepare(self, ids: list[int], images) -> tuple[list[int], list[PromptImage]]:
        """Token ids (each image's placeholder run, or one placeholder per image) and the
        images (PIL images or text/images.LoadedImage) -> the ids with runs expanded and the
        PromptImages in order (its own copies of `images`' PromptImages, placed)."""
        out = [replace(im, features=None) for im in self.images(images)]
        lengths = [self._tokens(im) for im in out]
        slots = [p for p, t in enumerate(ids) if t == self.image_token_id]
        if out and len(slots) == len(out) and sum(lengths) != len(out):  # one placeholder each: expand
            it = iter(lengths)
            ids = [x for t in ids for x in ([t] * next(it) if t == self.image_token_id else [t])]
            slots = [p for p, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != sum(lengths):
            raise ImageTokenError(f"the prompt holds {len(slots)} image placeholder token(s) (id "
                                  f"{self.image_token_id}) for {len(out)} image(s) taking {lengths} vision "
                                  "tokens (or one placeholder per image, expanded here)")
        at = 0
        for i, (im, n) in enumerate(zip(out, lengths)):
            run = slots[at:at + n]
            if run[-1] - run[0] != n - 1:
                raise ImageTokenError(f"image {i}'s {n} placeholder tokens are not one run: they start at "
                                      f"position {run[0]} and end at {run[-1]}")
            im.start, im.length, at = run[0], n, at + n
        return ids, out

    def _preprocess(self, images) -> list[PromptImage]:
        """PromptImages (start and length not yet placed) of PIL images or LoadedImages."""
        if images is None:
            return []
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of images, got {type(images).__name__}")
        if len(images) > MAX_IMAGES:
            raise ImageTokenError(f"{len(images)} images in one request: at most {MAX_IMAGES}")
        pil = [getattr(im, "image", im) for im in images]
        if any(isinstance(im, torch.Tensor) for im in pil):
            raise ValueError("a DeepSeek-OCR-2 engine takes images as pictures (PIL images or decoded "
                             "LoadedImages): its tiling depends on the picture, not on pixel values")
        if not pil:
            return []
        px = self.processor(pil)
        tiles = (px["pixel_values_local"].split(px["num_local_patches"]) if "pixel_values_local" in px
                 else [None] * len(pil))
        return [PromptImage(g, image_hash(im), 0, 0, tiles=t if t is None or t.shape[0] else None)
                for g, t, im in zip(px["pixel_values"], tiles, images)]

    # --------------------------------------------------------------- prefill
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.language.model.embed_tokens(ids)

    def _encode(self, todo: list[PromptImage]) -> None:
        if not todo:
            return
        device = self.model.projector.weight.device
        self.encoded += len(todo)
        counts = [0 if im.tiles is None else im.tiles.shape[0] for im in todo]
        tiles = torch.cat([im.tiles for im in todo if im.tiles is not None]).to(device) if sum(counts) else None
        features = self.model.encode_images(torch.stack([im.pixel_values for im in todo]).to(device), tiles, counts)
        for im, f in zip(todo, features):
            im.features = f.clone()

    def hidden(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The language model's final normed hidden states from embeddings."""
        lm = self.model.language
        freqs_cis = lm.rotary(positions)
        x = embeds
        for layer in lm.model.layers:
            x = layer(x, freqs_cis, cache)
        return lm.model.norm(x)
