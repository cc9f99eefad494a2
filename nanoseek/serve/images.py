"""A chat request's images: decoded within the server's limits, keyed by content hash, and
handed to the model through one seam (`engine_images`).

Every `image_url` part goes through nanoseek/text/images.py, the one door untrusted images
come in by: `data:` URLs sized before decoding, `file:` URLs only under `nanoseek serve
--image-dir`, nothing fetched from the network. A refusal is a 400 naming the limit
(`code` is the limit's name, the message the `nanoseek serve` option that sets it). The
images are checked before the model is asked, so a client hears of a bad image whatever
model is served; then a model that reads text only answers 400 saying so, never dropping
the image in silence.

Cache keys (`keyed_messages`) name each image by the sha256 of its RGB pixels, never by its
URL: the same picture in two requests (as PNG or WebP, inline or from a file) shares a key,
two different pictures never do, and no image bytes are kept in a cache key.
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.checkpoint.hf import vision_checkpoint
from nanoseek.engine.chat_images import CHAT_LIMITS, ImagePartError, chat_images, expand_prompt
from nanoseek.engine.chat_images import image_locations  # noqa: F401 (app.py reads it from here)
from nanoseek.serve.errors import APIError
from nanoseek.text.images import ImageInputError, ImageLimits, LoadedImage

# nanoseek serve's defaults, shared with LLM.chat (engine/chat_images.py)
SERVER_LIMITS = CHAT_LIMITS
OPTION = {"max_images": "--max-images-per-request", "max_bytes": "--max-image-bytes",
          "max_pixels": "--max-image-pixels", "image_dir": "--image-dir"}
MODEL_VISION_ATTRS = ("vision_model", "vision")  # DeepSeek-VL's SigLIP tower, DeepSeek-OCR-2's encoder


def request_images(messages, limits: ImageLimits, image_dir: Path | None) -> list[LoadedImage]:
    """Every image of the request decoded (engine/chat_images.chat_images: images in user
    messages only, the count checked before any image is read), or a 400 naming the part
    and the limit it broke. Blocks (decoding): run in a worker thread."""
    try:
        return chat_images(messages, limits, image_dir)
    except ImagePartError as e:
        raise refused(e.reason, e.param) from None


def refused(e: ImageInputError, param: str) -> APIError:
    option = OPTION.get(e.limit)
    hint = f" (this server's {option})" if option else ""
    return APIError(400, f"{param}: {e}{hint}", param=param, code=e.limit)


def reads_images(model) -> bool:
    """Whether a model has a vision side (DeepSeek-VL, DeepSeek-OCR-2)."""
    return any(getattr(model, a, None) is not None for a in MODEL_VISION_ATTRS)


def served_vision(llm, checkpoint=None) -> str | None:
    """The vision-language architecture behind the server, or None for a text model: the
    engine's model itself, or the checkpoint's config.json (an engine may serve a
    vision-language checkpoint through its language model alone)."""
    engine_vision = getattr(llm.engine, "vision", None)  # a DeepSeek-VL engine: engine/vision.py
    if engine_vision is not None:
        return type(engine_vision.model).__name__
    model = llm.engine.model
    if reads_images(model):
        return type(model).__name__
    return None if checkpoint is None else vision_checkpoint(checkpoint)


def engine_images(llm, model_name: str, images: list[LoadedImage], vision: str | None = None) -> int | None:
    """The seam where a request's decoded images reach the engine: the placeholder id the
    chat template writes for each image (None without images; the images then go with the
    prompt's ids, `engine_prompt`). A text-only model (`vision` None, from `served_vision`):
    400. DeepSeek-VL (MLA or MHA/GQA language model) and DeepSeek-OCR-2 engines take the
    images; an engine built on a vision-language checkpoint's language model alone: 501."""
    if not images:
        return None
    if vision is None:
        raise APIError(400, f"model {model_name!r} reads text only: it cannot see the {len(images)} "
                            "image(s) of this request; send text, or serve a vision-language model",
                       param="messages", code="images_not_supported")
    engine_vision = getattr(llm.engine, "vision", None)
    if engine_vision is None:
        raise APIError(501, f"model {model_name!r} is a vision-language model ({vision}), but this server's "
                            "engine runs its language model alone (serve the whole checkpoint to take images)",
                       param="messages", code="images_not_served")
    return engine_vision.image_token_id


def engine_prompt(llm, ids: list[int], images: list[LoadedImage]):
    """(what the engine is given, its prompt length once each placeholder is expanded to
    the image's tokens: what the context holds and usage counts). Counting an OCR-2 image's
    tokens runs its processor (the tiling depends on the picture), which may refuse the
    image: a 400 naming why. Blocks (preprocessing): run in a worker thread."""
    try:
        return expand_prompt(llm.engine, ids, images)
    except ValueError as e:  # the model's preprocessing or image count (ImageTokenError is one)
        raise APIError(400, f"messages: {e}", param="messages", code="image_unsupported") from None


def keyed_messages(messages: list[dict], images: list[LoadedImage]) -> list[dict]:
    """`messages` (as dumped for a cache key) with each image part's URL replaced by the
    content hash of the image decoded from it, in order. A request whose image parts do not
    match `images` one for one is refused: a URL must never become a key."""
    hashes = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            m = {**m, "content": [_keyed(p, hashes) for p in content]}
        out.append(m)
    if next(hashes, None) is not None:
        raise ValueError("more decoded images than image parts in the request")
    return out


def _keyed(part: dict, hashes) -> dict:
    if part.get("type") != "image_url":
        return part
    image = next(hashes, None)
    if image is None:
        raise ValueError("an image part without its decoded image: it cannot be keyed by content")
    detail = (part.get("image_url") or {}).get("detail")
    return {"type": "image_url", "image_url": {"sha256": image.sha256, "detail": detail}}
