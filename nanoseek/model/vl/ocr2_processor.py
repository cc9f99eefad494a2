"""DeepSeek-OCR-2's image preprocessing and the prompt's image placeholders.

The pixels come from transformers' DeepseekOcr2ImageProcessorPil (the backend AutoProcessor
picks where torchvision is absent; used as a library, so they are its pixels exactly):
  * the global view: the image resized so its longest side is `size` (1024), padded to a square
    with grey (127, 127, 127), scaled to [-1, 1] (mean 0.5, std 0.5);
  * the tiles, when the longest side exceeds `tile_size` (768): the grid of min..max tiles
    (2..6) whose aspect ratio is closest to the image's, the image resized onto that grid and
    cut into tile_size squares, row by row.
Written here: the bounds an untrusted image must respect, and how many `<image>` placeholders
an image takes, (size/64)² for the global view + (tile_size/64)² per tile + 1 separator
(DeepSeek's patch size 16 and 4x downsampling; 256 + 144·n + 1 at the published sizes).
"""

from __future__ import annotations

import math

from PIL import Image
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

from nanoseek.text.images import to_rgb

MAX_IMAGE_PIXELS = 4096 * 4096  # decoded width x height an image may have


class OCR2ImageProcessor:
    def __init__(self, size: int = 1024, tile_size: int = 768, min_patches: int = 2, max_patches: int = 6,
                 patch_size: int = 16, downsample_ratio: int = 4, max_pixels: int = MAX_IMAGE_PIXELS):
        """patch_size and downsample_ratio only count placeholders (the processor's own
        arguments): one vision token per patch_size·downsample_ratio pixels of a side."""
        if not 1 <= min_patches <= max_patches:
            raise ValueError(f"tiles: need 1 <= min_patches <= max_patches, got {min_patches}, {max_patches}")
        self.size, self.tile_size = size, tile_size
        self.patch_size, self.downsample_ratio, self.max_pixels = patch_size, downsample_ratio, max_pixels
        self.image_processor = DeepseekOcr2ImageProcessorPil(
            size={"height": size, "width": size}, tile_size=tile_size,
            min_patches=min_patches, max_patches=max_patches)

    def check(self, image: Image.Image) -> Image.Image:
        """An RGB image within the pixel bound, or a ValueError saying which bound it broke."""
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image, got {type(image).__name__}")
        w, h = image.size
        if w < 1 or h < 1 or w * h > self.max_pixels:
            raise ValueError(f"image of {w}x{h} pixels: must be non-empty and at most {self.max_pixels} "
                             "pixels (max_pixels)")
        if max(w, h) > min(w, h) * self.size:  # the global view keeps the aspect: a side of 0 pixels
            raise ValueError(f"image of {w}x{h} pixels: too elongated for the {self.size}-pixel global view "
                             f"(its shorter side would be under a pixel; the longer side may be at most "
                             f"{self.size} times the shorter)")
        return to_rgb(image)  # transparency onto white, as the processor's convert_rgb does

    def __call__(self, images: list[Image.Image]) -> dict:
        """PIL images -> pixel_values [N, 3, size, size], pixel_values_local [T, 3, tile, tile]
        (absent when no image is tiled) and num_local_patches (tiles per image)."""
        out = self.image_processor([self.check(im) for im in images], return_tensors="pt")
        result = {"pixel_values": out["pixel_values"], "num_local_patches": [int(n) for n in out["num_local_patches"]]}
        if "pixel_values_local" in out:
            result["pixel_values_local"] = out["pixel_values_local"]
        return result

    def tokens_per_side(self, side: int) -> int:
        return math.ceil(side / self.patch_size / self.downsample_ratio)

    def num_image_tokens(self, num_tiles: int) -> int:
        """Placeholders of one image with `num_tiles` tiles: global view, tiles, separator."""
        return self.tokens_per_side(self.size) ** 2 + num_tiles * self.tokens_per_side(self.tile_size) ** 2 + 1

    def expand_placeholders(self, ids: list[int], num_local_patches: list[int], image_token_id: int) -> list[int]:
        """A prompt with one `<image>` id per image -> the same with each repeated as many times
        as that image has vision tokens (what the model's forward expects)."""
        where = [i for i, t in enumerate(ids) if t == image_token_id]
        if len(where) != len(num_local_patches):
            raise ValueError(f"the prompt has {len(where)} image placeholders (id {image_token_id}) "
                             f"for {len(num_local_patches)} images")
        out, images = [], iter(num_local_patches)
        for t in ids:
            out.extend([t] * self.num_image_tokens(next(images)) if t == image_token_id else [t])
        return out
