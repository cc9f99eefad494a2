"""Conversations with images for supervised fine-tuning: rows whose user content holds OpenAI `image_url` parts -> token ids with each image's placeholder run, assistant-only labels, and the images, packed so each window keeps its own.

A row is a chat row of data/chat.py whose user messages may hold content parts
`{"type": "image_url", "image_url": {"url": ...}}`: a `data:image/...;base64` URL, a path
relative to the JSONL file's directory, or a `file:` URL inside that directory. Every image
is read and decoded by nanoseek/text/images.py under its limits, with the JSONL file's
directory as the only directory it may read (no `..`, no symlink out, nothing from the
network).

The ids are the ones the server and the engine give the same conversation: the chat
template writes one placeholder (the model's `image_token_id`) where each image stands
(`chat_parts(..., image_token_id)`), and each placeholder is expanded to the image's run of
`image_tokens` placeholders (vl_layout.expand_image_placeholders, what engine/vision.py
does), whose embeddings the image's aligned SigLIP features replace. Placeholder tokens are
user content: never targets.

Packing lays conversations end to end as data/chat.py does; a window carries the images of
the conversations it holds, in order, so the k-th image of a batch (read row by row) fills
the k-th run of placeholders. A conversation with images longer than a window cannot be cut
(an image's run would be split from its features): it is refused, naming its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.chat import ChatDataError, pack, read_jsonl, row_messages, shift_labels
from nanoseek.model.transformer import IGNORE_INDEX
from nanoseek.model.vl.vl_layout import expand_image_placeholders
from nanoseek.text.chat_template import ChatFormatError, chat_parts
from nanoseek.text.images import ImageInputError, ImageLimits, image_parts, load_image_part
from nanoseek.text.tokenizer import Tokenizer


@dataclass
class ImageConversation:
    """One conversation, where it came from ("file:line" or "task T example i"), and the
    directory its relative image paths are read from (None: data: URLs only)."""
    messages: list[dict]
    where: str
    image_dir: Path | None = None


def read_image_conversations(paths) -> list[ImageConversation]:
    """Every conversation of the JSONL files `paths`, each with its file's directory."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return [ImageConversation(row_messages(row, where), where, Path(p).resolve().parent)
            for p in paths for row, where in read_jsonl(p)]


def first_image_row(conversations: list[ImageConversation]) -> ImageConversation | None:
    """The first conversation that holds an image part (for a text model's refusal)."""
    return next((c for c in conversations if image_parts(c.messages)), None)


def part_with_url(part: dict, image_dir: Path | None) -> dict:
    """A relative path (no URL scheme) becomes the file: URL of that path under `image_dir`;
    images.py then reads it only if it lies inside the directory."""
    spec = part.get("image_url") if isinstance(part, dict) else None
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url or ":" in url.split("/", 1)[0] or image_dir is None:
        return part
    if url.startswith("/"):  # an absolute path: a file URL (quoted: '#', '?', '%' are a name's), checked against the directory
        return {**part, "image_url": {**spec, "url": Path(url).as_uri()}}
    return {**part, "image_url": {**spec, "url": (image_dir / url).as_uri()}}


@dataclass(frozen=True)
class ImageSource:
    """Where one training image comes from: its part (a data: or file: URL), the directory
    it may be read from, and its conversation's name for errors. Windows keep sources, not
    pictures: a decoded 4096² photo is 48 MB, so a data set of photos is decoded batch by
    batch (`load`), each time under the same limits."""
    part: dict
    image_dir: Path | None
    where: str
    k: int

    def load(self, limits: ImageLimits):
        try:
            return load_image_part(self.part, limits, self.image_dir).image
        except ImageInputError as e:  # e.g. the file changed since it was checked
            raise ChatDataError(f"{self.where}: image {self.k}: {e}") from None


def conversation_images(conv: ImageConversation, limits: ImageLimits) -> list[ImageSource]:
    """The sources of a conversation's image parts, in order, each read and decoded once
    here so that a bad image is refused before training (naming its row)."""
    parts = image_parts(conv.messages)
    if len(parts) > limits.max_images:
        raise ChatDataError(f"{conv.where}: {len(parts)} images; the limit is {limits.max_images} "
                            "per conversation (max_images)")
    out = [ImageSource(part_with_url(part, conv.image_dir), conv.image_dir, conv.where, k)
           for k, part in enumerate(parts)]
    for src in out:
        src.load(limits)
    return out


def encode_conversation(conv: ImageConversation, tokenizer, image_token_id: int,
                        image_tokens: int) -> tuple[list[int], list[bool]]:
    """Ids with each image's placeholder run, and per id whether the assistant wrote it."""
    try:
        parts = chat_parts(conv.messages, False, image_token_id)
    except (ChatFormatError, KeyError, TypeError, AttributeError) as e:
        raise ChatDataError(f"{conv.where}: {e}") from None
    ids, trained = Tokenizer.of(tokenizer).encode_parts(parts)
    if image_token_id in {t for t, w in zip(ids, trained) if w}:
        raise ChatDataError(f"{conv.where}: the assistant's text encodes to the image placeholder id")
    out_ids, out_trained = [], []
    for t, w in zip(ids, trained):
        n = image_tokens if t == image_token_id else 1
        out_ids += [t] * n
        out_trained += [w] * n
    assert out_ids == expand_image_placeholders(ids, image_token_id, image_tokens)
    return out_ids, out_trained


@dataclass
class ImageWindows:
    """Packed windows [N, seq_len] and, per window, the indices of its images (in order)
    into `images` (ImageSources, decoded under `limits` and preprocessed by `processor`
    when a batch takes them)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    window_images: list[list[int]]
    images: list
    processor: object
    meta: dict = field(default_factory=dict)
    limits: ImageLimits = field(default_factory=ImageLimits)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def rows(self, index: int, batch_size: int, seed: int) -> list[int]:
        """Micro-batch `index`'s windows: data/chat.py's seeded order, new every epoch."""
        n, rows = len(self), []
        for k in range(index * batch_size, (index + 1) * batch_size):
            epoch, pos = divmod(k, n)
            rows.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
        return rows

    def take(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, labels, pixel_values [K,3,H,W]): the images of the rows, row by row."""
        from nanoseek.model.vl.vl_image import preprocess
        picked = [self.images[i].load(self.limits) for r in rows for i in self.window_images[r]]
        size = self.meta["image_size"]
        px = (preprocess(picked, self.processor, max_images=len(picked)) if picked
              else torch.zeros(0, 3, size, size))
        return self.inputs[rows], self.labels[rows], px

    def batch(self, index: int, batch_size: int, seed: int):
        return self.take(self.rows(index, batch_size, seed))


def image_windows(conversations: list[ImageConversation], tokenizer, seq_len: int, image_token_id: int,
                  image_tokens: int, processor, image_size: int, packing: bool = True,
                  limits: ImageLimits = ImageLimits()) -> ImageWindows:
    """Conversations -> packed windows with assistant-only labels and their images."""
    examples, images, per_conv = [], [], []
    for conv in conversations:
        ids, trained = encode_conversation(conv, tokenizer, image_token_id, image_tokens)
        x, y = shift_labels(ids, trained)
        if all(t == IGNORE_INDEX for t in y):
            raise ChatDataError(f"{conv.where}: the assistant's turns are empty, nothing to learn")
        pics = conversation_images(conv, limits)
        if pics and len(x) > seq_len:
            raise ChatDataError(f"{conv.where}: {len(x)} tokens with its {len(pics)} image(s) of "
                                f"{image_tokens} tokens each; a window holds {seq_len} (--seq-len) "
                                "and an image's tokens cannot be cut")
        per_conv.append(list(range(len(images), len(images) + len(pics))))
        images += pics
        examples.append((x, y))
    if not examples:
        raise ChatDataError("no conversations to train on")
    packed = pack(examples, seq_len, tokenizer.pad_token_id, packing)
    window_images = assign_images(examples, per_conv, seq_len, packing)
    meta = {"conversations": packed.conversations, "windows": len(packed), "targets": packed.targets,
            "truncated": packed.truncated, "tokens": sum(len(x) for x, _ in examples),
            "packing": packing, "images": len(images), "image_tokens": image_tokens,
            "image_size": image_size}
    return ImageWindows(packed.inputs, packed.labels, window_images, images, processor, meta, limits)


def assign_images(examples, per_conv: list[list[int]], seq_len: int, packing: bool) -> list[list[int]]:
    """Which images each window holds: data/chat.py `pack`'s window boundaries, replayed."""
    windows: list[list[int]] = []
    cur_len, cur_imgs, started = 0, [], False
    for (x, _), imgs in zip(examples, per_conv):
        n = min(len(x), seq_len)
        if started and (not packing or cur_len + n > seq_len):
            windows.append(cur_imgs)
            cur_len, cur_imgs = 0, []
        cur_len, cur_imgs, started = cur_len + n, cur_imgs + imgs, True
    if started:
        windows.append(cur_imgs)
    return windows
