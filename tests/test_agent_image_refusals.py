"""`nanoseek agent --image` refusals name what was wrong: which data: URL (by index), a path
that exists but is not a regular file (never opened: a FIFO would block), and the look
tool's timeout."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from nanoseek.agent.images import read_images
from nanoseek.agent.tools.vision import look_tool
from nanoseek.text.images import ImageInputError


def test_a_bad_data_url_is_named_by_its_index(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(ImageInputError, match=r"^--image 1 \(a data: URL\): .*not valid base64"):
        read_images([str(tmp_path / "ok.png"), "data:image/png;base64,@@@@"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_a_directory_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    for name in ("pipe.png", "dir.png"):
        with pytest.raises(ImageInputError, match=rf"--image '.*{name}': not a regular file"):
            read_images([str(tmp_path / name)])
    with pytest.raises(ImageInputError, match="no such file"):
        read_images([str(tmp_path / "missing.png")])


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_the_look_timeout_must_be_positive(tmp_path, timeout):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="--vision-timeout .* must be positive"):
        look_tool(read_images([str(tmp_path / "ok.png")]), "http://127.0.0.1:9/v1", "m", timeout_s=timeout)
