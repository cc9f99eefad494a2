"""Images from untrusted input: OpenAI `image_url` content parts decoded within limits, the one
door every image comes in by (the server, the agent, chat data with images).

A request names an image by URL. `data:` URLs (PNG, JPEG, WebP, GIF's first frame) are sized
before they are decoded: the base64 text before `b64decode`, the image's width and height from
its header before a pixel is decompressed (a 100-byte PNG can claim 100,000 x 100,000 pixels,
the "decompression bomb"), PIL's own `MAX_IMAGE_PIXELS` check made an error. `file:` URLs are
read only under a directory the caller names (symlinks resolved, `..` refused, nothing outside
it), and nothing is ever fetched from the network. Each refusal is an `ImageInputError` that
names its limit, which a server answers with a 400.

Decoded images are RGB as a viewer shows them (EXIF orientation applied, transparency
composited onto white, as transformers' `load_image` and processors do) and carry a content
hash: sha256 of the size and the RGB pixels, so the same picture sent as PNG or as WebP
(lossless) keys the prefix cache and the response caches alike, and bytes that differ only in
other metadata do too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

# MIME type of a data: URL -> the PIL format its bytes must be
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP",
           "image/gif": "GIF"}


class ImageInputError(ValueError):
    """An image refused; `limit` names the rule or limit it broke (a server's 400 says it)."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send. The defaults hold a 4K photo and refuse more."""

    max_images: int = 8                  # image parts per request
    max_bytes: int = 10 * 2**20          # encoded bytes of one image (a data URL's payload, a file)
    max_pixels: int = 4096 * 4096        # width * height of one image, read from its header
    max_side: int = 8192                 # its longer side (a 1 x 16M strip is no picture)

    def __post_init__(self):
        for name in ("max_images", "max_bytes", "max_pixels", "max_side"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLimits.{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: RGB pixels, their content hash, and where it came from (for logs)."""

    image: Image.Image
    sha256: str
    source: str  # "data:image/png" or the file's resolved path


def content_hash(image: Image.Image) -> str:
    """sha256 of the RGB pixels (`to_rgb`, as the processors see them) and the size: equal for
    the same picture in any container."""
    rgb = to_rgb(image)
    h = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def image_parts(messages: list[dict]) -> list[dict]:
    """The `image_url` content parts of a conversation, in order."""
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            parts += [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
    return parts


def load_images(messages: list[dict], limits: ImageLimits = ImageLimits(),
                image_dir: str | Path | None = None) -> list[LoadedImage]:
    """Every image of a conversation, decoded; the count is checked before any is read.
    `image_dir`: the one directory `file:` URLs may name (None: file URLs are refused)."""
    parts = image_parts(messages)
    if len(parts) > limits.max_images:
        raise ImageInputError(f"{len(parts)} images in one request; the limit is "
                              f"{limits.max_images} (max_images)", "max_images")
    return [load_image_part(p, limits, image_dir) for p in parts]


def load_image_part(part: dict, limits: ImageLimits = ImageLimits(),
                    image_dir: str | Path | None = None) -> LoadedImage:
    """One OpenAI part: {"type": "image_url", "image_url": {"url": ..., "detail": ...}}."""
    spec = part.get("image_url") if isinstance(part, dict) else None
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url:
        raise ImageInputError('an image part must be {"type": "image_url", "image_url": '
                              '{"url": "data:image/png;base64,..."}}', "image_part")
    return load_image_url(url, limits, image_dir)


def load_image_url(url: str, limits: ImageLimits = ImageLimits(),
                   image_dir: str | Path | None = None) -> LoadedImage:
    """A data: URL, or a file: URL under `image_dir`; any other scheme is refused."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        mime, data = decode_data_url(url, limits)
        return decode_image(data, limits, expect=FORMATS[mime], source=f"data:{mime}")
    if scheme == "file":
        path = resolve_file_url(url, image_dir)
        return decode_image(read_image_file(path, limits), limits, source=str(path))
    if scheme in ("http", "https", "ftp", "ws", "wss"):
        raise ImageInputError(f"image URLs are never fetched from the network ({scheme}:); send "
                              "the image inline as a data:image/...;base64 URL", "image_url_scheme")
    raise ImageInputError(f"image URL scheme {short(scheme) or '(none)'!r} is not supported: use a "
                          "data:image/...;base64 URL (or file: under the allowed image directory)",
                          "image_url_scheme")


def short(text: str, n: int = 100) -> str:
    """A client's text as an error quotes it: at most n characters (a URL may be megabytes)."""
    return text if len(text) <= n else text[:n] + f"... ({len(text):,} characters)"


def decode_data_url(url: str, limits: ImageLimits) -> tuple[str, bytes]:
    """(MIME type, bytes) of `data:image/png;base64,...`, the size checked before decoding."""
    header, comma, payload = url[len("data:"):].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if not comma or "base64" not in params[1:]:
        raise ImageInputError("an image data URL must be data:<image type>;base64,<data>",
                              "image_data_url")
    if mime not in FORMATS:
        raise ImageInputError(f"image type {short(mime) or '(none)'!r} is not accepted; expected one of "
                              f"{sorted(FORMATS)}", "image_format")
    payload = payload.strip()
    if len(payload) // 4 * 3 > limits.max_bytes + 3:  # base64: 4 characters per 3 bytes
        raise ImageInputError(f"an image of about {len(payload) // 4 * 3:,} bytes; the limit is "
                              f"{limits.max_bytes:,} bytes (max_bytes)", "max_bytes")
    payload = "".join(payload.split())  # MIME's line breaks (RFC 2045) are not data
    payload += "=" * (-len(payload) % 4)  # nor is the padding some encoders leave out
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"the image data URL is not valid base64 ({e})", "image_data_url") from None
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"an image of {len(data):,} bytes; the limit is {limits.max_bytes:,} "
                              "bytes (max_bytes)", "max_bytes")
    return mime, data


def resolve_file_url(url: str, image_dir: str | Path | None) -> Path:
    """The file a file: URL names, refused unless it lies (symlinks resolved) under `image_dir`."""
    if image_dir is None:
        raise ImageInputError("file: image URLs are refused: no directory was allowed to read "
                              "images from", "image_dir")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageInputError(f"file URL host {parts.netloc!r}: only local files are read", "image_dir")
    raw = os.fsdecode(unquote_to_bytes(parts.path))  # a file name need not be UTF-8
    if "\x00" in raw:
        raise ImageInputError(f"file URL {short(url)!r}: a path holds no NUL character", "image_dir")
    if not raw.startswith("/"):
        raise ImageInputError(f"file URL {short(url)!r} must name an absolute path (file:///dir/image.png)",
                              "image_dir")
    if ".." in Path(raw).parts:
        raise ImageInputError(f"file URL {short(url)!r}: '..' is not allowed in image paths", "image_dir")
    root = Path(image_dir).resolve(strict=True)
    # containment first, and one answer for "outside" and "absent outside": which files exist
    # elsewhere on the server is none of the client's business
    outside = ImageInputError(f"image {short(raw)!r} is not a file under the allowed image directory", "image_dir")
    try:
        if not Path(raw).resolve(strict=False).is_relative_to(root):
            raise outside
        path = Path(raw).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageInputError(f"no image file {short(raw)!r} in the allowed image directory", "image_dir") from None
    if not path.is_relative_to(root):  # a link made between the two resolves
        raise outside
    return path


def read_image_file(path: Path, limits: ImageLimits) -> bytes:
    """A regular file's bytes, at most max_bytes (never blocking on a FIFO or a device)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ImageInputError(f"cannot read image {str(path)!r} ({e.strerror})", "image_dir") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageInputError(f"{str(path)!r} is not a regular file", "image_dir")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > limits.max_bytes:
            raise ImageInputError(f"image {str(path)!r} is {info.st_size:,} bytes; the limit is "
                                  f"{limits.max_bytes:,} bytes (max_bytes)", "max_bytes")
        data = f.read(limits.max_bytes + 1)  # the file may grow after the stat
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"image {str(path)!r} is over {limits.max_bytes:,} bytes (max_bytes)",
                              "max_bytes")
    return data


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), expect: str | None = None,
                 source: str = "image") -> LoadedImage:
    """Decode `data` (its first frame) to RGB, the size read from the header and checked
    before the pixels are. `expect`: the PIL format the sender declared."""
    allowed = sorted(set(FORMATS.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=allowed)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            pil = Image.MAX_IMAGE_PIXELS or limits.max_pixels
            which = "max_pixels" if limits.max_pixels <= pil else "PIL's MAX_IMAGE_PIXELS"
            raise ImageInputError(f"{source}: its header claims more pixels than are decoded here ({e}); the "
                                  f"limit is {min(limits.max_pixels, pil):,} pixels ({which})", "max_pixels") from None
        except UnidentifiedImageError:
            raise ImageInputError(f"{source}: not a readable image; accepted formats are "
                                  f"{allowed}", "image_format") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ImageInputError(f"{source}: the image header is damaged ({e})", "image_decode") from None
        found = "JPEG" if img.format == "MPO" else img.format  # a multi-picture JPEG is a JPEG
        if expect is not None and found != expect:
            raise ImageInputError(f"{source}: the bytes are {found}, not the declared "
                                  f"{expect}", "image_format")
        check_size(img.width, img.height, limits, source)
        try:
            img.seek(0)
            img.load()
            rgb = to_rgb(ImageOps.exif_transpose(img))
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ImageInputError(f"{source}: the image data is damaged or truncated ({e})",
                                  "image_decode") from None
    return LoadedImage(rgb, content_hash(rgb), source)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as a viewer shows the picture: transparency composited onto white, as transformers'
    image processors do (`convert_to_rgb`), not dropped (two icons drawn in alpha alone would
    otherwise both be a black square, and share a content hash); 16-bit grey scaled to 8 bits,
    not clipped (a converted 16-bit picture is otherwise all but white)."""
    if image.mode == "RGB":
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def check_size(width: int, height: int, limits: ImageLimits, source: str = "image") -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"{source}: an empty image ({width}x{height})", "image_decode")
    if max(width, height) > limits.max_side:
        raise ImageInputError(f"{source}: {width}x{height} pixels; the longest side may be "
                              f"{limits.max_side} (max_side)", "max_side")
    if width * height > limits.max_pixels:
        raise ImageInputError(f"{source}: {width}x{height} = {width * height:,} pixels; the "
                              f"limit is {limits.max_pixels:,} (max_pixels)", "max_pixels")


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG (deterministic for the same pixels)."""
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def image_url_part(png: bytes) -> dict:
    """An OpenAI content part carrying PNG bytes inline as a data: URL."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}
