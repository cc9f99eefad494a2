"""Images in engine requests: a vision-language model's prompts, their images encoded once and spliced into each prefill chunk.

A request to a DeepSeek-VL engine is token ids with each image's placeholder run (one
placeholder per vision token; a single placeholder per image is expanded here) and the
images. At admission every image becomes a `PromptImage`: its pixel values, its content
hash and the span of prompt positions its vision tokens take. The vision tower runs when
the first prefill chunk that reads an image's span runs, once for that image, and its
feature rows stay on the sequence until the request finishes (a preempted request keeps
them: recomputing its prefix needs them again). Each chunk's embeddings are the text
embeddings with the rows of the spans it covers spliced in, so a chunk may start or end
anywhere inside an image. An image whose span lies wholly in prefix-cached blocks is never
encoded: its latents are already in the cache.

The prefix cache keys a block by its token ids and the content hashes of the images it
shows (block_manager.block_key): the same picture in two requests hits, another picture
behind the same placeholder ids never does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
from PIL import Image

from nanoseek.model.vl.deepseek_vl import DeepseekVLForConditionalGeneration
from nanoseek.model.vl.vl_image import image_processor, preprocess
from nanoseek.model.vl.vl_layout import ImageTokenError
from nanoseek.text.images import content_hash


@dataclass(eq=False)
class PromptImage:
    """One image of a request: where its vision tokens sit in the prompt and what they are."""
    pixel_values: torch.Tensor       # [3, H, W], as the model's image processor gives them
    content_hash: str                # sha256 of the picture (text/images.content_hash) or of the pixel values
    start: int                       # prompt position of its first vision token
    length: int                      # its vision tokens
    features: torch.Tensor | None = None  # [length, D]: computed by the first chunk that reads it
    tiles: torch.Tensor | None = None     # DeepSeek-OCR-2: the image's tiles [n, 3, t, t] (engine/vision_ocr2.py)

    @property
    def end(self) -> int:
        return self.start + self.length


def prepared(images) -> bool:
    """Whether `images` are PromptImages already (`VisionPrompts.images`); a mix of those and
    pictures is refused."""
    if not isinstance(images, (list, tuple)) or not images:
        return False
    kinds = {isinstance(im, PromptImage) for im in images}
    if kinds == {True, False}:
        raise ValueError("give a request's images all as pictures or pixel values, or all as the "
                         "engine's preprocessed PromptImages")
    return kinds == {True}


def image_hash(image) -> str:
    """The content hash that keys an image in the prefix cache: a decoded image's
    (`LoadedImage.sha256`, or text/images.content_hash of a PIL image); for pixel values,
    sha256 of their shape, dtype and bytes."""
    if hasattr(image, "sha256") and hasattr(image, "image"):  # text/images.LoadedImage
        return image.sha256
    if isinstance(image, Image.Image):
        return content_hash(image)
    t = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"pixels {tuple(t.shape)}\n".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class VisionPrompts:
    """The engine's side of a DeepSeek-VL model: turns (ids, images) into a prompt with
    `PromptImage`s, and a batch of prefill chunks into input embeddings."""

    def __init__(self, model: DeepseekVLForConditionalGeneration, processor=None):
        if not isinstance(model, DeepseekVLForConditionalGeneration):
            raise ValueError(f"the engine takes images for DeepSeek-VL models; {type(model).__name__} "
                             "is served for text only, if at all")
        self.model = model
        self.image_token_id = model.config.image_token_id
        self.tokens_per_image = model.config.image_tokens
        self.processor = processor or image_processor(None, model.config.vision.image_size)
        self.encoded = 0  # images run through the vision tower (a measure of reuse)

    # ------------------------------------------------------------- admission
    def images(self, images) -> list[PromptImage]:
        """A request's images preprocessed (pixel values and content hash) as PromptImages not
        yet placed in a prompt, which `prepare` copies and places: the n samples of one prompt,
        or the server's count of its tokens and its request, preprocess once. PromptImages
        given are returned as they are."""
        return list(images) if prepared(images) else self._preprocess(images)

    def _preprocess(self, images) -> list[PromptImage]:
        pixels, hashes = self._pixels(images)
        return [PromptImage(px, h, 0, 0) for px, h in zip(pixels, hashes)]

    def prepare(self, ids: list[int], images) -> tuple[list[int], list[PromptImage]]:
        """Token ids (a placeholder run per image, or one placeholder per image) and the
        images (PIL images, text/images.LoadedImage, pixel values [3, H, W] / [N, 3, H, W], or
        `images`' PromptImages) -> the prompt's ids with runs expanded and its PromptImages in
        order (its own: placed, no features yet)."""
        templates = self.images(images)
        T, n = self.tokens_per_image, len(templates)
        slots = [p for p, t in enumerate(ids) if t == self.image_token_id]
        if n and len(slots) == n and T > 1:  # one placeholder per image: expand each to its run
            ids = [x for t in ids for x in ([t] * T if t == self.image_token_id else [t])]
            slots = [p for p, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != n * T:
            raise ImageTokenError(f"the prompt holds {len(slots)} image placeholder token(s) (id "
                                  f"{self.image_token_id}) for {n} image(s); each image takes {T} "
                                  f"(or one placeholder per image, expanded here)")
        out = []
        for i, template in enumerate(templates):
            run = slots[i * T:(i + 1) * T]
            if run[-1] - run[0] != T - 1:
                raise ImageTokenError(f"image {i}'s {T} placeholder tokens are not one run: they start at "
                                      f"position {run[0]} and end at {run[-1]}")
            out.append(replace(template, start=run[0], length=T, features=None))
        return ids, out

    def _pixels(self, images) -> tuple[list[torch.Tensor], list[str]]:
        if images is None:
            return [], []
        if isinstance(images, torch.Tensor):
            images = list(images) if images.ndim == 4 else [images]
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be a list of images, got {type(images).__name__}")
        hashes = [image_hash(im) for im in images]
        pil = [getattr(im, "image", im) for im in images]
        tensors = [im for im in pil if isinstance(im, torch.Tensor)]
        if tensors and len(tensors) != len(pil):
            raise ValueError("give the images of one request all as pictures or all as pixel values")
        if tensors:
            shape = self.model.config.vision.image_size
            for i, t in enumerate(tensors):
                if t.shape != (3, shape, shape):
                    raise ImageTokenError(f"image {i}: pixel values must be [3, {shape}, {shape}] (the "
                                          f"model's image processor's), got {list(t.shape)}")
                if not bool(torch.isfinite(t).all()):  # NaN would spread through attention's masked 0 * NaN
                    raise ImageTokenError(f"image {i}: pixel values hold NaN or inf")
            return [t.float() for t in tensors], hashes
        return list(preprocess(pil, self.processor)) if pil else [], hashes

    # --------------------------------------------------------------- prefill
    def embed(self, ids: torch.Tensor, starts: list[int], lens: list[int], images: list[list[PromptImage]]
              ) -> torch.Tensor:
        """Padded chunk ids [B, S] at positions starts[b].. (lens[b] real) -> embeddings
        [B, S, D]: text embeddings, and at image positions the rows of each image's features
        that the chunk covers. An image is encoded the first time a chunk reads it (those
        of the whole batch in one call of the vision tower)."""
        x = self.embed_tokens(ids)
        spans = [(b, st, im, max(im.start, st), min(im.end, st + n))
                 for b, (st, n, imgs) in enumerate(zip(starts, lens, images)) for im in imgs]
        spans = [s for s in spans if s[3] < s[4]]  # the images this chunk covers, and where
        self._encode_once([im for _, _, im, _, _ in spans if im.features is None])
        for b, st, im, lo, hi in spans:
            x[b, lo - st:hi - st] = im.features[lo - im.start:hi - im.start].to(x.dtype)
        return x

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.model.embed_tokens(ids)

    def image_tokens(self, images) -> list[int]:
        """Vision tokens of each image: the model's image_tokens, whatever the picture."""
        return [self.tokens_per_image] * len(images or [])

    def _encode_once(self, todo: list[PromptImage]) -> None:
        """Encode each distinct picture of `todo` once (by content hash: the n samples of one
        prompt, or one picture in several requests of a batch) and give every copy its features."""
        first: dict[str, PromptImage] = {}
        for im in todo:
            first.setdefault(im.content_hash, im)
        self._encode(list(first.values()))
        for im in todo:
            im.features = first[im.content_hash].features

    def _encode(self, todo: list[PromptImage]) -> None:
        if not todo:
            return
        device = self.model.aligner.linear1.weight.device
        self.encoded += len(todo)
        features = self.model.encode_images(torch.stack([im.pixel_values for im in todo]).to(device))
        for im, f in zip(todo, features):
            im.features = f.clone()  # its own storage: freed with its request

    def hidden(self, embeds: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The language model's final normed hidden states from embeddings."""
        return self.model.hidden(embeds, positions, cache)
