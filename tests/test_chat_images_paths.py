"""Image paths in SFT rows (data/chat_images.py): an absolute path inside the JSONL file's
directory is read whatever characters its name holds ('#', '?', '%' are not URL syntax
there), and one outside it is still refused."""

from __future__ import annotations

import pytest
from PIL import Image

from nanoseek.data.chat import ChatDataError
from nanoseek.data.chat_images import ImageConversation, conversation_images
from nanoseek.text.images import ImageLimits


def row(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize("name", ["plain.png", "a#1.png", "what?.png", "100%41.png", "sp ace.png"])
def test_absolute_and_relative_paths_read_any_file_name(tmp_path, name):
    Image.new("RGB", (5, 3), (10, 200, 30)).save(tmp_path / name, format="PNG")
    for url in (str(tmp_path / name), name):
        conv = ImageConversation(row(url), "rows.jsonl:1", tmp_path)
        [src] = conversation_images(conv, ImageLimits())
        assert src.load(ImageLimits()).size == (5, 3)


def test_an_absolute_path_outside_the_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (5, 3)).save(tmp_path / "out#side.png", format="PNG")
    conv = ImageConversation(row(str(tmp_path / "out#side.png")), "rows.jsonl:1", tmp_path / "d")
    with pytest.raises(ChatDataError, match="rows.jsonl:1: image 0: .*not a file under the allowed image directory"):
        conversation_images(conv, ImageLimits())


def test_sources_not_pictures_are_kept_and_a_changed_file_is_refused_by_row(tmp_path):
    """conversation_images checks each image once and keeps where it comes from (a data set
    of photos is decoded batch by batch); a file replaced afterwards by one over the limits
    is refused when a batch reads it, naming its row."""
    Image.new("RGB", (5, 3)).save(tmp_path / "a.png", format="PNG")
    conv = ImageConversation(row("a.png"), "rows.jsonl:7", tmp_path)
    [src] = conversation_images(conv, ImageLimits())
    assert not isinstance(src, Image.Image) and src.where == "rows.jsonl:7"
    Image.new("RGB", (300, 300)).save(tmp_path / "a.png", format="PNG")
    with pytest.raises(ChatDataError, match="rows.jsonl:7: image 0: .*"):
        src.load(ImageLimits(max_pixels=200 * 200))
