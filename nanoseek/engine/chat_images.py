"""A conversation's images on their way to the engine: what `LLM.chat` and the server share.

OpenAI's chat messages carry images as `image_url` content parts. Each is decoded by
nanoseek/text/images.py (the one door untrusted images come in by) under `ImageLimits`,
the count checked before any image is read. Images are read in **user** messages only:
DeepSeek-VL's chat format places them in the user's turn, and its template has no place
for an image in a system prompt, an assistant reply or a tool's output (a tool that looks
at an image, such as the agent's vision tool, returns text). An image anywhere else is
refused by name (`image_role`), before any image is decoded.

The chat template writes one placeholder id (the model's `image_token_id`) where each
image part stood; the engine expands each to the image's run of vision tokens
(engine/vision.py), so the prompt the context holds, and usage counts, is
`len(ids) + images * (tokens_per_image - 1)` long.
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.text.images import ImageInputError, ImageLimits, LoadedImage, load_image_part

# the server's defaults (nanoseek serve --max-images-per-request, --max-image-bytes), which
# LLM.chat shares: an image of 2 MiB is about 2.7 MiB of base64, inside the server's 4 MiB body
CHAT_LIMITS = ImageLimits(max_images=4, max_bytes=2 << 20)
IMAGE_ROLES = ("user",)


class ImagePartError(ImageInputError):
    """An image refused, with where it stood: `param` is "messages.<i>.content.<j>" (or
    "messages" for the count) and `reason` the refusal without it."""

    def __init__(self, reason: ImageInputError, param: str):
        super().__init__(f"{param}: {reason}", reason.limit)
        self.param, self.reason = param, reason


class TextOnlyModelError(ValueError):
    """Images sent to a model that reads text only."""


def _role(m) -> str | None:
    return m.get("role") if isinstance(m, dict) else getattr(m, "role", None)


def _content(m):
    return m.get("content") if isinstance(m, dict) else getattr(m, "content", None)


def _part_type(p) -> str | None:
    return p.get("type") if isinstance(p, dict) else getattr(p, "type", None)


def image_locations(messages) -> list[tuple[int, int]]:
    """(message, part) of every image part, in order: `messages` are dicts or the server's
    `ChatMessage`s."""
    return [(i, j) for i, m in enumerate(messages) if isinstance(_content(m), list)
            for j, p in enumerate(_content(m)) if _part_type(p) == "image_url"]


def check_image_roles(messages, where: list[tuple[int, int]]) -> None:
    """Refuse an image outside a user message, naming the message, its role and the rule."""
    for i, j in where:
        role = _role(messages[i])
        if role not in IMAGE_ROLES:
            raise ImagePartError(ImageInputError(
                f"a {role} message holds an image: images are read in user messages only (the "
                "chat format has no place for them in system, assistant or tool messages; a tool "
                "that looks at an image returns text)", "image_role"), f"messages.{i}.content.{j}")


def chat_images(messages, limits: ImageLimits = CHAT_LIMITS,
                image_dir: str | Path | None = None) -> list[LoadedImage]:
    """Every image of a conversation, decoded, or an `ImagePartError` naming the part and the
    limit it broke. Roles and the count are checked before any image is read. Blocks
    (decoding): a server runs it in a worker thread."""
    where = image_locations(messages)
    check_image_roles(messages, where)
    if len(where) > limits.max_images:
        raise ImagePartError(ImageInputError(f"{len(where)} images in one request; the limit is "
                                             f"{limits.max_images} (max_images)", "max_images"), "messages")
    images = []
    for i, j in where:
        part = _content(messages[i])[j]
        part = part if isinstance(part, dict) else part.model_dump()
        try:
            images.append(load_image_part(part, limits, image_dir))
        except ImageInputError as e:
            raise ImagePartError(e, f"messages.{i}.content.{j}") from None
    return images


def image_placeholder(engine, count: int, model_name: str = "this model") -> int | None:
    """The placeholder id the chat template writes per image (None without images); a
    `TextOnlyModelError` when the engine reads text only."""
    if not count:
        return None
    vision = getattr(engine, "vision", None)  # engine/vision.VisionPrompts of a DeepSeek-VL engine
    if vision is None:
        raise TextOnlyModelError(
            f"{model_name} reads text only ({type(engine.model).__name__}): it cannot see the {count} "
            "image(s) of this conversation; send text, or load a vision-language checkpoint "
            "(DeepSeek-VL or DeepSeek-OCR-2)")
    return vision.image_token_id


def expand_prompt(engine, ids: list[int], images: list[LoadedImage]):
    """(what the engine is given, the prompt's length once each placeholder is expanded to
    the image's tokens: what the context holds and usage counts)."""
    if not images:
        return ids, len(ids)
    images = engine.vision.images(images)  # preprocessed once: counted here, placed per request
    expanded = sum(n - 1 for n in engine.vision.image_tokens(images))  # OCR-2's count depends on the tiles
    return {"prompt_token_ids": ids, "images": images}, len(ids) + expanded
