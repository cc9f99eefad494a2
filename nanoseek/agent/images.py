"""The images given to an agent run: read once, within limits, and named so that the model
can point at them but never at a file or URL of its own choosing.

`nanoseek agent --image FILE` reads each file through nanoseek/text/images.py (the one door
untrusted images come in by) with the file's own directory as the only directory it may
read, under `ImageLimits`; a `data:` URL is decoded the same way; a network URL is
refused (nothing is fetched). Each image keeps its encoded bytes (sent on as a data URL, to
the model or to the vision tool) and is recorded by `ref()`: its index, name, content hash
(sha256 of the RGB pixels, text/images.content_hash), size and byte count, never the bytes.
The model names an image by its index or its name (`pick_image`), so a tool that looks at
images reads only what the user gave.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.text.images import (FORMATS, ImageInputError, ImageLimits, decode_data_url, decode_image,
                                  read_image_file, resolve_file_url)

MIME = {v: k for k, v in FORMATS.items() if k != "image/jpg"}  # PIL format -> MIME type
MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"))


@dataclass(frozen=True)
class AgentImage:
    index: int
    name: str              # the file's name (unique within a run), or "image<index>" for a data: URL
    sha256: str            # content hash of the decoded pixels
    width: int
    height: int
    mime: str
    data: bytes = field(repr=False)  # the encoded bytes, as read (checked against the limits)

    def part(self) -> dict:
        """The OpenAI content part that carries it (a data: URL)."""
        url = f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")
        return {"type": "image_url", "image_url": {"url": url}}

    def ref(self) -> dict:
        """What a trajectory records of it: never the bytes or a data URL."""
        return {"index": self.index, "name": self.name, "sha256": self.sha256,
                "width": self.width, "height": self.height, "bytes": len(self.data)}

    def label(self) -> str:
        return f"{self.index}: {self.name} ({self.width}x{self.height} {self.mime.split('/')[1].upper()})"


def image_format(data: bytes) -> str:
    """The PIL format of the bytes decode_image accepted (PNG, JPEG, GIF, WEBP)."""
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    return "WEBP"  # the one format left that decode_image reads (RIFF....WEBP)


def read_image(spec: str, index: int, limits: ImageLimits) -> AgentImage:
    """One `--image` value: a file (read under its own directory) or a data: URL."""
    scheme = spec.split(":", 1)[0].lower() if ":" in spec else ""
    if scheme == "data":
        try:
            mime, data = decode_data_url(spec, limits)
        except ImageInputError as e:  # name which --image it was (a data: URL has no name)
            raise ImageInputError(f"--image {index} (a data: URL): {e}", e.limit) from None
        loaded = decode_image(data, limits, expect=FORMATS[mime], source=f"image {index} (data:{mime})")
        name = f"image{index}"
    elif scheme in ("http", "https", "ftp", "ws", "wss", "file"):
        raise ImageInputError(f"--image {spec[:80]!r}: give a file path (or a data: URL); image URLs "
                              "are never fetched", "image_url_scheme")
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ImageInputError(f"--image {spec!r}: no such file", "image_file")
        if not path.is_file():  # checked without opening it: a FIFO would block, a device never end
            raise ImageInputError(f"--image {spec!r}: not a regular file (a directory, FIFO or device "
                                  "is never read)", "image_file")
        name = path.name  # as given: a link keeps its own name
        path = path.resolve()
        path = resolve_file_url(path.as_uri(), path.parent)  # the file's directory is the only one read
        data = read_image_file(path, limits)
        loaded = decode_image(data, limits, source=str(path))
    fmt = image_format(data)
    return AgentImage(index, name, loaded.sha256, loaded.image.width, loaded.image.height, MIME[fmt], data)


def read_images(specs: list[str], limits: ImageLimits = ImageLimits()) -> list[AgentImage]:
    """All `--image` values, the count checked before any is read; names made unique."""
    if len(specs) > limits.max_images:
        raise ImageInputError(f"{len(specs)} images; the limit is {limits.max_images} (max_images)", "max_images")
    read = [read_image(spec, i, limits) for i, spec in enumerate(specs)]
    images, seen = [], set()
    names = {im.name for im in read}  # a renamed duplicate must not take another image's name
    for i, im in enumerate(read):
        name = im.name
        while name in seen or (name != im.name and name in names):
            name = f"{name}#{i}"
        seen.add(name)
        images.append(im if name == im.name else
                      AgentImage(im.index, name, im.sha256, im.width, im.height, im.mime, im.data))
    return images


def pick_image(images: list[AgentImage], key) -> AgentImage:
    """The image the model names, by index (0, "0") or name; ValueError lists what exists."""
    text = key.strip() if isinstance(key, str) else None
    if text is not None:  # a name first (a file may be called "7"), then an index written as text
        for im in images:
            if text == im.name:
                return im
    index = key if isinstance(key, int) and not isinstance(key, bool) else None
    if text is not None and text.isascii() and text.isdigit() and len(text) <= 6:
        index = int(text)
    if index is not None and 0 <= index < len(images):
        return images[index]
    have = "; ".join(im.label() for im in images) or "none"
    raise ValueError(f"no image {str(key)[:100]!r}: name one of the images given with the task by index or "
                     f"name ({have})")


def images_note(images: list[AgentImage], tool: str) -> str:
    """The line a text-only model reads instead of the images: what exists, and how to look."""
    listed = "; ".join(im.label() for im in images)
    return f"Images given with this task (call {tool} with the image's index or name to see one): {listed}"
