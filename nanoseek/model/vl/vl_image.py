"""DeepSeek-VL's image preprocessing: transformers' DeepseekVLImageProcessor (PIL backend) used as a library, behind size and count bounds.

DeepSeek-VL resizes an image so its longer side is the tower's `image_size` (bicubic, the
shorter side kept >= `min_size`), pads it to a square with the CLIP mean colour, rescales to
[0, 1] and normalises with CLIP's mean and std. That is transformers' processor, and nanoseek
calls it rather than copying it, so pixel values equal `AutoProcessor`'s by construction.
What is added: images arrive decoded (nanoseek/text/images.py decodes untrusted bytes within
limits); here they are checked again (count, pixels) and converted to RGB, as DeepSeek's
reference does, so a grey or RGBA picture gives three channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, DeepseekVLImageProcessorPil

from nanoseek.text.images import to_rgb

# where a checkpoint keeps its image processor: alone, or inside the processor's config
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
MAX_IMAGES = 16  # per call: each is image_tokens tokens (576 at 384 px)
MAX_PIXELS = 4096 * 4096  # of one decoded image, before resizing


class ImagePreprocessError(ValueError):
    """An image that cannot be preprocessed: not an image, too many, too large."""


def image_processor(path: str | os.PathLike | None = None, image_size: int | None = None):
    """The checkpoint's image processor (preprocessor_config.json or processor_config.json),
    else DeepSeek-VL's defaults at `image_size` (the vision tower's; 384 without one)."""
    if path is not None and any((Path(path) / f).exists() for f in PROCESSOR_FILES):
        proc = AutoImageProcessor.from_pretrained(str(path))
        if "DeepseekVLImageProcessor" not in type(proc).__name__:
            raise ImagePreprocessError(f"{path}: its image processor is {type(proc).__name__}, not "
                                       "DeepSeek-VL's")
        return proc
    size = image_size or 384
    return DeepseekVLImageProcessorPil(size={"height": size, "width": size})


def preprocess(images: list[Image.Image], processor, max_images: int = MAX_IMAGES,
               max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Decoded images -> pixel_values [N, 3, size, size] float32, as the processor gives them."""
    if not isinstance(images, (list, tuple)) or not images:
        raise ImagePreprocessError("expected a non-empty list of PIL images")
    if len(images) > max_images:
        raise ImagePreprocessError(f"{len(images)} images; the limit is {max_images} (max_images)")
    rgb = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ImagePreprocessError(f"image {i} is a {type(im).__name__}, not a PIL image")
        w, h = im.size
        if w < 1 or h < 1 or w * h > max_pixels:
            raise ImagePreprocessError(f"image {i} is {w}x{h} pixels; the limit is {max_pixels:,} "
                                       "pixels (max_pixels)")
        rgb.append(to_rgb(im))  # the conversion the content hash keys (text/images.py)
    return processor(images=rgb, return_tensors="pt")["pixel_values"].float()
