"""Rendered arithmetic: seeded pictures of `a op b`, held-out images that share neither a
problem nor a byte with training, demonstrations that read the picture and earn full reward,
options checked by name, and a clear refusal from the text-only chat template."""

import pytest

from nanoseek.data.chat import ChatDataError, encode_with_mask
from nanoseek.data.tasks import TASKS, TaskError, load_task
from nanoseek.data.tasks.rendered_arithmetic import PIL_DEFAULT, font_set, reading_of
from nanoseek.data.tasks.prompting import prompt_ids
from nanoseek.text.images import load_image_part
from nanoseek.text.tokenizer import Tokenizer, train_tokenizer

SMALL = {"digits": 1, "ops": "+-*"}


@pytest.fixture(scope="module")
def task():
    return load_task("rendered_arithmetic", **SMALL)


def test_registered_with_its_name():
    assert "rendered_arithmetic" in TASKS
    assert load_task("rendered_arithmetic").name == "rendered_arithmetic"


def test_same_seed_same_images_other_seed_others(task):
    a = task.examples("train", 20, seed=3)
    b = load_task("rendered_arithmetic", **SMALL).examples("train", 20, seed=3)
    assert [e.meta["image"] for e in a] == [e.meta["image"] for e in b]
    other = task.examples("train", 20, seed=4)
    assert {e.meta["image"] for e in a}.isdisjoint(e.meta["image"] for e in other)


def test_train_and_test_share_no_problem_no_image_and_no_rendering_seed(task):
    train = [e for seed in (0, 1) for e in task.examples("train", 300, seed)]
    test = [e for seed in (0, 1) for e in task.examples("test", 60, seed)]

    def problem(e):  # 3+5 and 5+3 are one problem
        a, op, b = e.meta["a"], e.meta["op"], e.meta["b"]
        return (frozenset((a, b)) if op in "+*" else (a, b)), op

    assert not {problem(e) for e in train} & {problem(e) for e in test}
    assert not {e.meta["image"] for e in train} & {e.meta["image"] for e in test}
    assert not {e.meta["image_sha256"] for e in train} & {e.meta["image_sha256"] for e in test}
    assert {e.meta["render"]["seed"] % 2 for e in train} == {0}
    assert {e.meta["render"]["seed"] % 2 for e in test} == {1}


@pytest.mark.parametrize("split", ["train", "test"])
def test_demonstrations_read_the_picture_then_earn_full_reward(task, split):
    for ex in task.examples(split, 60, seed=0):
        assert reading_of(ex.response) == (ex.meta["a"], ex.meta["op"], ex.meta["b"])
        r = task.reward(ex, ex.response)
        assert r.correct and r.total == pytest.approx(1.0), (ex.response, r)
        wrong = ex.response.replace(f"<answer>{ex.answer}<", f"<answer>{int(ex.answer) + 1}<")
        assert not task.reward(ex, wrong).correct


def test_prompt_is_an_openai_image_part_then_the_text(task):
    ex = task.examples("test", 1, seed=0)[0]
    (user,) = task.prompt_messages(ex)
    image_part, text_part = user["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    loaded = load_image_part(image_part)  # the untrusted-input door reads it back
    assert loaded.sha256 == ex.meta["image_sha256"]
    assert loaded.image.size == (192, 64) == task.image(ex).size
    assert text_part == {"type": "text", "text": ex.prompt}
    assert {e.prompt for e in task.examples("test", 20)} == {ex.prompt}  # only the picture tells them apart
    assert task.messages(ex)[-1] == {"role": "assistant", "content": ex.response}


def test_renderings_vary_in_font_size_colour_and_angle():
    task = load_task("rendered_arithmetic", digits=2, image_size=[160, 48])
    styles = [e.meta["render"] for e in task.examples("train", 60, seed=0)]
    for field, at_least in (("font", 5), ("font_px", 4), ("background", 20), ("angle", 20)):
        assert len({str(s[field]) for s in styles}) >= at_least, field
    assert {e.meta["image"] for e in task.examples("train", 60, seed=0)}.__len__() == 60
    assert task.image(task.examples("train", 1)[0]).size == (160, 48)


def test_ink_is_drawn_and_stays_inside_the_image():
    """Without noise and blur, pixels nearer the ink than the background cover part of the
    picture and none of its border."""
    task = load_task("rendered_arithmetic", digits=3, noise=0, fonts=[PIL_DEFAULT])
    for ex in task.examples("train", 10, seed=0):
        img, style = task.image(ex), ex.meta["render"]
        if style["blur"]:
            continue
        px = img.load()
        w, h = img.size
        fg, bg = style["foreground"], style["background"]

        def near(c, ref):
            return sum((u - v) ** 2 for u, v in zip(c, ref))
        ink = [(x, y) for x in range(w) for y in range(h) if near(px[x, y], fg) < near(px[x, y], bg)]
        assert len(ink) > 20
        assert all(0 < x < w - 1 and 0 < y < h - 1 for x, y in ink)


def test_fonts_found_and_the_default_face_always_there():
    fonts = font_set("bundled")
    assert fonts[-1] == PIL_DEFAULT
    assert load_task("rendered_arithmetic", **SMALL).fonts == fonts  # the default set
    only_default = load_task("rendered_arithmetic", fonts=[PIL_DEFAULT], **SMALL)
    assert {e.meta["render"]["font"] for e in only_default.examples("train", 10)} == {PIL_DEFAULT}


def test_the_default_faces_are_matplotlibs_whatever_the_system_has(tmp_path, monkeypatch):
    """The default ("bundled") set is matplotlib's DejaVu and STIX faces and PIL's default, so
    the same seeds draw the same pictures on every machine; "system" adds the faces under
    FONT_DIRS (a face installed there changes "system" only)."""
    from pathlib import Path
    from nanoseek.data.tasks import rendered_arithmetic as ra
    bundled = font_set("bundled")
    before = load_task("rendered_arithmetic", **SMALL).examples("test", 1, seed=3)[0].meta["image"]
    names = {Path(f).name for f in bundled[:-1]}
    assert {"DejaVuSans.ttf", "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf", "STIXGeneral.ttf"} <= names
    assert all("matplotlib" in f for f in bundled[:-1])
    (tmp_path / "fonts").mkdir()
    (tmp_path / "fonts" / "LiberationSans-Regular.ttf").write_bytes(Path(bundled[0]).read_bytes())
    monkeypatch.setattr(ra, "FONT_DIRS", (str(tmp_path / "fonts"),))
    ra._found_fonts.cache_clear()
    try:
        assert font_set("bundled") == bundled
        assert str(tmp_path / "fonts" / "LiberationSans-Regular.ttf") in font_set("system")
        after = load_task("rendered_arithmetic", **SMALL).examples("test", 1, seed=3)[0].meta["image"]
    finally:
        ra._found_fonts.cache_clear()
    assert after == before  # drawn with the extra system face present, and without it
    with pytest.raises(TaskError, match="fonts='DejaVuSans.ttf' must be one of"):
        load_task("rendered_arithmetic", fonts="DejaVuSans.ttf")


def test_plain_style_is_black_on_white_upright_and_near_the_centre():
    """style="plain": faces, sizes and noise vary; colours, slant, lines, blur do not, and the
    ink stays within the middle of the picture. The varied style is unchanged by the option."""
    import numpy as np
    plain = load_task("rendered_arithmetic", style="plain", noise=0, image_size=[96, 64])
    varied = load_task("rendered_arithmetic", image_size=[96, 64])
    exs = plain.examples("train", 30)
    styles = [e.meta["render"] for e in exs]
    assert all(s["background"] == [255, 255, 255] and s["foreground"] == [0, 0, 0] and s["angle"] == 0
               and s["blur"] == 0 and s["plain"] for s in styles)
    assert len({s["font"] for s in styles}) > 3 and len({s["font_px"] for s in styles}) > 3
    for e in exs:
        ink = np.asarray(plain.image(e).convert("L")) < 128
        assert ink.any()
        rows, cols = np.nonzero(ink)
        assert abs((rows.min() + rows.max()) / 2 - 32) < 12 and abs((cols.min() + cols.max()) / 2 - 48) < 16
    assert [e.meta["render"]["plain"] for e in varied.examples("train", 3)] == [False] * 3
    assert varied.examples("train", 3)[0].meta["image"] != plain.examples("train", 3)[0].meta["image"]


@pytest.mark.parametrize("options,message", [
    ({"style": "fancy"}, "style='fancy' must be one of"),
    ({"image_size": [8, 8]}, "image_size"),
    ({"image_size": "big"}, "image_size"),
    ({"digits": 6, "image_size": [64, 32]}, "cannot hold 6-digit"),
    ({"noise": 2}, "noise"),
    ({"fonts": ["/nonexistent/Font.ttf"]}, "does not exist"),
    ({"fonts": []}, "no face"),
    ({"digits": 0}, "task rendered_arithmetic: digits"),
    ({"colour": "red"}, "task rendered_arithmetic: unknown option.*colour"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(TaskError, match=message):
        load_task("rendered_arithmetic", **options)


def test_a_text_only_model_is_refused_clearly(task):
    """SFT rendering and engine prompts go through the text chat template, which names the image."""
    ex = task.examples("train", 1)[0]
    with pytest.raises(ChatDataError, match="holds an image.*vision-language model"):
        encode_with_mask(task.messages(ex), tokenizer=None)
    tok = train_tokenizer(["1 + 2 = 3", "Compute what the image shows."] * 4, vocab_size=300)
    with pytest.raises(ValueError, match="holds an image.*vision-language model"):
        prompt_ids(Tokenizer.of(tok), task.prompt_messages(ex))


def test_sft_of_a_text_only_checkpoint_is_refused_before_training(tmp_path):
    from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
    from tests.posttrain_utils import make_init
    init = make_init(tmp_path / "init")
    cfg = SFTConfig(init=str(init), task="rendered_arithmetic", task_options=SMALL, task_examples=4,
                    train=sft_train_config(max_steps=1, batch_size=2, seq_len=128))
    with pytest.raises(ValueError, match="holds an image.*vision-language model"):
        sft(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    assert not (tmp_path / "run" / "model.safetensors").exists()
