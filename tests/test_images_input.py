"""Untrusted images (nanoseek/text/images.py): hostile data URLs and file URLs are refused with
an error naming the limit, sizes are checked before pixels are decoded, nothing is fetched from
the network, and the content hash keys the picture, not its container."""

import base64
import io
import os
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from nanoseek.text import images
from nanoseek.text.images import (ImageInputError, ImageLimits, content_hash, decode_image,
                                  image_url_part, load_image_part, load_image_url, load_images,
                                  png_bytes)


def picture(size=(32, 24), seed=0, mode="RGB") -> Image.Image:
    rnd = bytes((i * 37 + seed * 11) % 256 for i in range(size[0] * size[1] * 3))
    return Image.frombytes("RGB", size, rnd).convert(mode)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of ~100 bytes whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def refused(limit, fn, *args, **kw) -> str:
    with pytest.raises(ImageInputError) as e:
        fn(*args, **kw)
    assert e.value.limit == limit, (e.value.limit, str(e.value))
    return str(e.value)


# ------------------------------------------------------------------ data: URLs
@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif"),
                                      ("JPEG", "image/jpeg")])
def test_each_accepted_format_decodes_to_rgb(fmt, mime):
    img = picture()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    got = load_image_url(data_url(encoded(img, fmt, **kw), mime))
    assert got.image.mode == "RGB" and got.image.size == img.size and got.source == f"data:{mime}"
    if fmt in ("PNG", "WEBP"):
        assert got.image.tobytes() == img.tobytes()


def test_content_hash_keys_the_pixels_not_the_container():
    img = picture()
    meta = PngImagePlugin.PngInfo()
    meta.add_text("comment", "other bytes, same picture")
    as_png, as_png_meta = encoded(img, "PNG"), encoded(img, "PNG", pnginfo=meta)
    as_webp = encoded(img, "WEBP", lossless=True)
    assert len({as_png, as_png_meta, as_webp}) == 3
    hashes = {load_image_url(data_url(b, m)).sha256 for b, m in
              ((as_png, "image/png"), (as_png_meta, "image/png"), (as_webp, "image/webp"))}
    assert hashes == {content_hash(img)}
    assert content_hash(picture(seed=1)) != content_hash(img)
    assert content_hash(picture((24, 32))) != content_hash(picture((32, 24)))  # same bytes, other size
    assert content_hash(img.convert("RGBA")) == content_hash(img)


def test_a_gif_gives_its_first_frame():
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    gif = encoded(red, "GIF", save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    assert load_image_url(data_url(gif, "image/gif")).image.getpixel((3, 3)) == (255, 0, 0)


def test_huge_dimensions_in_a_tiny_png_are_refused_before_decoding():
    # Decoding these would fail as truncated; the header check must come first.
    assert len(png_claiming(5000, 5000)) < 200
    assert "max_pixels" in refused("max_pixels", load_image_url, data_url(png_claiming(5000, 5000)))
    assert "max_side" in refused("max_side", load_image_url, data_url(png_claiming(10_000, 1)))
    # Past PIL's own MAX_IMAGE_PIXELS (x2): DecompressionBombError, even with our limits raised.
    lax = ImageLimits(max_pixels=10**12, max_side=10**6)
    msg = refused("max_pixels", load_image_url, data_url(png_claiming(100_000, 100_000)), lax)
    assert f"the limit is {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's MAX_IMAGE_PIXELS)" in msg
    msg = refused("max_pixels", load_image_url, data_url(png_claiming(100_000, 100_000)))  # the server's, lower
    assert f"the limit is {ImageLimits().max_pixels:,} pixels (max_pixels)" in msg


def test_pil_bomb_warning_is_an_error(monkeypatch):
    """Between PIL's MAX_IMAGE_PIXELS and twice it PIL only warns; here it refuses."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    refused("max_pixels", decode_image, png_bytes(picture((40, 40))))
    assert decode_image(png_bytes(picture((30, 30)))).image.size == (30, 30)


def test_truncated_and_garbage_data():
    whole = png_bytes(picture((64, 64)))
    refused("image_decode", load_image_url, data_url(whole[: len(whole) // 2]))
    refused("image_format", load_image_url, data_url(b"not an image at all"))
    refused("image_format", load_image_url, data_url(png_claiming(0, 4)))  # PIL reads no 0-wide PNG


def test_wrong_or_missing_mime_and_bad_base64():
    png = png_bytes(picture())
    assert "PNG, not the declared JPEG" in refused("image_format", load_image_url, data_url(png, "image/jpeg"))
    refused("image_format", load_image_url, data_url(png, "text/html"))
    refused("image_format", load_image_url, data_url(png, "image/svg+xml"))
    refused("image_format", load_image_url, data_url(encoded(picture(), "BMP"), "image/png"))
    refused("image_data_url", load_image_url, "data:image/png," + png.hex())  # not base64
    refused("image_data_url", load_image_url, "data:image/png;base64,@@@@")
    refused("image_data_url", load_image_url, "data:image/png;base64")


def test_base64_with_line_breaks_or_without_padding_is_read():
    png = png_bytes(picture())
    text = base64.b64encode(png).decode()
    want = load_image_url(data_url(png)).sha256
    wrapped = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # MIME's 76-character lines
    assert load_image_url("data:image/png;base64," + wrapped).sha256 == want
    assert load_image_url("data:image/png;base64," + text.rstrip("=")).sha256 == want


def test_oversized_payload_is_refused_before_base64_decoding(monkeypatch):
    def never(*a, **k):
        raise AssertionError("decoded before the size check")
    monkeypatch.setattr(images.base64, "b64decode", never)
    msg = refused("max_bytes", load_image_url, "data:image/png;base64," + "A" * 4000, ImageLimits(max_bytes=1000))
    assert "1,000 bytes" in msg


def test_too_many_images_are_refused_before_any_is_read():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,broken"}}
    msgs = [{"role": "user", "content": [part] * 5 + [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": [part] * 4}]
    assert "9 images" in refused("max_images", load_images, msgs)
    good = {"type": "image_url", "image_url": {"url": data_url(png_bytes(picture()))}}
    assert len(load_images([{"role": "user", "content": [good, good]}], ImageLimits(max_images=2))) == 2
    refused("max_images", load_images, [{"role": "user", "content": [good] * 3}], ImageLimits(max_images=2))


@pytest.mark.parametrize("part", [{"type": "image_url"}, {"type": "image_url", "image_url": "data:x"},
                                  {"type": "image_url", "image_url": {"url": ""}}, "image"])
def test_malformed_parts(part):
    refused("image_part", load_image_part, part)


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://127.0.0.1/a.png",
                                 "HTTPS://example.com/a.png", "ftp://host/a.png"])
def test_nothing_is_fetched_from_the_network(url, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("network touched")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert "never fetched from the network" in refused("image_url_scheme", load_image_url, url)


@pytest.mark.parametrize("url", ["javascript:alert(1)", "blob:abc", "/etc/passwd", "a.png"])
def test_other_schemes_are_refused(url):
    refused("image_url_scheme", load_image_url, url)


# ------------------------------------------------------------------ file: URLs
@pytest.fixture()
def dirs(tmp_path):
    root, outside = tmp_path / "allowed", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.png").write_bytes(png_bytes(picture()))
    (outside / "secret.png").write_bytes(png_bytes(picture(seed=2)))
    return root, outside


def test_a_file_under_the_allowed_directory_is_read(dirs):
    root, _ = dirs
    got = load_image_url(f"file://{root}/a.png", image_dir=root)
    assert got.sha256 == content_hash(picture()) and got.source == str((root / "a.png").resolve())
    (root / "sub").mkdir()
    os.symlink(root / "a.png", root / "sub" / "link.png")  # a link that stays inside is fine
    assert load_image_url(f"file://localhost{root}/sub/link.png", image_dir=root).sha256 == got.sha256
    assert load_image_url(f"file://{root}/%61.png", image_dir=root).sha256 == got.sha256  # %61 = a


def test_file_urls_without_an_allowed_directory_are_refused(dirs):
    root, _ = dirs
    assert "no directory was allowed" in refused("image_dir", load_image_url, f"file://{root}/a.png")


def test_symlink_escapes_are_refused(dirs):
    root, outside = dirs
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "linkdir")
    assert "not a file under" in refused("image_dir", load_image_url, f"file://{root}/link.png", image_dir=root)
    refused("image_dir", load_image_url, f"file://{root}/linkdir/secret.png", image_dir=root)


@pytest.mark.parametrize("tail", ["../outside/secret.png", "%2e%2e/outside/secret.png", "sub/../../outside/secret.png"])
def test_path_traversal_is_refused(dirs, tail):
    root, _ = dirs
    assert "'..'" in refused("image_dir", load_image_url, f"file://{root}/{tail}", image_dir=root)


def test_outside_relative_missing_remote_and_special_files(dirs):
    root, outside = dirs
    refused("image_dir", load_image_url, f"file://{outside}/secret.png", image_dir=root)
    refused("image_dir", load_image_url, "file:a.png", image_dir=root)
    refused("image_dir", load_image_url, f"file://{root}/missing.png", image_dir=root)
    refused("image_dir", load_image_url, f"file://otherhost{root}/a.png", image_dir=root)
    os.mkfifo(root / "pipe.png")  # opening must not block on it
    assert "not a regular file" in refused("image_dir", load_image_url, f"file://{root}/pipe.png", image_dir=root)
    refused("image_dir", load_image_url, f"file://{root}", image_dir=root)  # a directory


def test_files_outside_get_one_answer_whether_or_not_they_exist(dirs):
    """No probing the server's disk: an existing file outside the directory and a missing one
    are refused alike."""
    root, outside = dirs
    here = refused("image_dir", load_image_url, f"file://{outside}/secret.png", image_dir=root)
    absent = refused("image_dir", load_image_url, f"file://{outside}/absent.png", image_dir=root)
    assert here.replace("secret", "absent") == absent


def test_a_huge_url_is_quoted_short_in_the_error():
    message = refused("image_url_scheme", load_image_url, "x" * 1_000_000 + ":y")
    assert len(message) < 400 and "1,000,000 characters" in message


def test_pictures_decode_as_a_viewer_shows_them():
    """Transparency composited onto white (transformers' convert_to_rgb), the EXIF orientation
    applied, 16-bit grey scaled to 8 bits: pictures that look different never share a hash."""
    from transformers.image_transforms import convert_to_rgb
    cat, dog = (Image.new("RGBA", (16, 8), (0, 0, 0, 0)) for _ in range(2))
    cat.putpixel((1, 1), (0, 0, 0, 255))
    dog.putpixel((5, 5), (0, 0, 0, 255))
    got = [load_image_url(data_url(encoded(im, "PNG"))) for im in (cat, dog)]
    assert got[0].sha256 != got[1].sha256
    assert got[0].image.tobytes() == convert_to_rgb(cat, return_numpy=False).tobytes()
    assert [content_hash(im) for im in (cat, dog)] == [g.sha256 for g in got]  # a picture given as PIL keys alike
    upright = picture((12, 8))
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotated 180 degrees
    tagged = load_image_url(data_url(encoded(upright, "PNG", exif=exif)))
    assert tagged.image.tobytes() == upright.rotate(180).tobytes()
    grey = Image.frombytes("I;16", (4, 1), struct.pack("<4H", 0, 256, 30000, 65535))
    assert list(load_image_url(data_url(encoded(grey, "PNG"))).image.getchannel(0).tobytes()) == [0, 1, 117, 255]


def test_a_file_over_the_byte_limit_is_refused(dirs):
    root, _ = dirs
    big = png_bytes(picture((256, 256)))
    (root / "big.png").write_bytes(big)
    refused("max_bytes", load_image_url, f"file://{root}/big.png", ImageLimits(max_bytes=len(big) - 1), root)
    refused("max_pixels", load_image_url, f"file://{root}/big.png", ImageLimits(max_pixels=1000), root)


def test_image_url_part_round_trips():
    img = picture()
    part = image_url_part(png_bytes(img))
    assert part["type"] == "image_url" and load_image_part(part).sha256 == content_hash(img)


@pytest.mark.parametrize("field", ["max_images", "max_bytes", "max_pixels", "max_side"])
def test_limits_must_be_positive_integers(field):
    for bad in (0, -1, 1.5, None, True):
        with pytest.raises(ValueError, match=f"ImageLimits.{field}"):
            ImageLimits(**{field: bad})
