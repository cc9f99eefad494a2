"""Rendered arithmetic: two numbers and an operator drawn as an image, the answer in `<answer>`,
for vision-language models.

`load_task("rendered_arithmetic", digits=2, ops="+", image_size=[192, 64], noise=0.08,
target="result", style="varied", fonts="bundled")`.
Each problem of `arithmetic` is drawn with PIL in a face chosen among `fonts` ("bundled":
the 16 DejaVu and STIX faces in matplotlib's data and PIL's default, the same on every
machine with the same matplotlib and Pillow; "system": those and the DejaVu / Liberation
faces the machine has installed; or a list of TTF paths), at a random size, place, slant and
colour pair, with faint distracting lines, blur and pixel noise. The user's message is an
OpenAI content part with the PNG as a data: URL, then the instruction; the demonstration
first reads the picture, then works the columns as `arithmetic` does:

    [image: 47 + 38]  ->  <think> The image shows 47 + 38. / 7+8=15, carry 1 / 4+3+1=8 </think>
                          <answer>85</answer>

`target="reading"` asks for the transcription alone: the prompt asks what the image shows
and the demonstration is `<answer>47 + 38</answer>` (scored by exact match, `read_accuracy`):
the reading half of a picture-to-calculator agent. `target="tool"` is the whole agent, in
tool_use's format: the system prompt offers the calculator, the user's message is the
instruction then the picture (as `nanoseek agent --image` sends them), and the demonstration
reads the picture into a call, takes the tool's output and answers:

    <think> The image shows 47 + 38. </think> calculator({"expression": "47 + 38"})
    tool: 85    ->    <answer>85</answer>

Held-out images are never training images, twice over: the split is decided by the problem
(arithmetic's canonical key, so 3+5 and 5+3 fall on the same side) and every rendering seed
carries its split in its lowest bit. `meta["render"]` names the face each image was drawn
in. The set of faces is part of the task: a model trained on one set reads faces it never
saw far worse (docs/post-training.md), which is why the default set does not depend on
the machine's packages.

`style="plain"` keeps the face, size and noise varying and drops the rest: black on white,
no slant, lines or blur, the expression within a fifth of the free room around the centre.
A vision tower trained from scratch reads these far sooner than the varied ones
(docs/post-training.md measures both).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from nanoseek.data.tasks.arithmetic import OPS, Arithmetic, add_steps, apply, mul_steps, sub_steps
from nanoseek.data.tasks.base import FORMAT_HINT, Example, TaskError
from nanoseek.data.tasks.rewards import ANSWER, END_ANSWER, answer_of, r1_response
from nanoseek.data.tasks.tool_use import SYSTEM as TOOL_SYSTEM, tool_accuracy, tool_format
from nanoseek.text.special_tokens import END_THINK, THINK
from nanoseek.text.images import content_hash, decode_image, image_url_part, png_bytes

PROMPT = "Compute what the image shows. " + FORMAT_HINT.format(what="result")
READ_PROMPT = "Write the expression the image shows in <answer></answer>."
TOOL_PROMPT = "Compute what the image shows. Use the calculator, then give the result in <answer></answer>."
TARGETS = ("result", "reading", "tool")
STYLES = ("varied", "plain")
READING = re.compile(r"The image shows (-?\d+) ([-+*]) (-?\d+)\.")
PIL_DEFAULT = "pil-default"
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
# Text faces that draw digits and + - * plainly (no symbol, display or hairline cuts).
FONT_NAME = re.compile(r"(DejaVu(Sans|Serif)(Mono|Condensed)?|Liberation(Sans|Serif|Mono|SansNarrow))"
                       r"(-(Bold|Oblique|Italic|BoldOblique|BoldItalic|Regular))?\.ttf"
                       r"|STIXGeneral(Bol|BolIta|Italic)?\.ttf")
# "bundled": the faces in matplotlib's data (DejaVu Sans, Sans Mono, Serif in four cuts each,
# STIX General in four) and PIL's default: the same pictures on every machine with the same
# matplotlib and Pillow. "system": those and every matching face under FONT_DIRS, which
# depends on the machine's packages (Debian's chromium brings the 16 Liberation faces).
FONT_SETS = ("bundled", "system")
MIN_FONT_PX = 12


class RenderedArithmetic(Arithmetic):
    def __init__(self, digits: int = 2, ops: str = OPS, image_size=(192, 64), noise: float = 0.08,
                 fonts: list[str] | None = None, target: str = "result", style: str = "varied", **options):
        if target not in TARGETS:
            raise TaskError(f"task rendered_arithmetic: target={target!r} must be one of {TARGETS}")
        if style not in STYLES:
            raise TaskError(f"task rendered_arithmetic: style={style!r} must be one of {STYLES}")
        self.style = style
        self.target = target
        if target == "reading":
            options.setdefault("format_weight", 0.0)  # no <think> block to reward
        if target == "tool":
            self.system = TOOL_SYSTEM
        try:
            super().__init__(digits=digits, ops=ops, **options)
        except TaskError as e:  # arithmetic's checks, named for this task
            raise TaskError(str(e).replace("task arithmetic", "task rendered_arithmetic", 1)) from None
        self.name = "rendered_arithmetic"
        self.max_tokens += 16  # the reading line
        if target == "reading":
            self.max_tokens = 8 + 4 * digits
            self.rewarder.accuracy = lambda ex, c: read_accuracy(c, ex.answer)
        if target == "tool":
            self.max_tokens = 64  # per turn: the call, then the answer
            self.rewarder.accuracy = lambda ex, c: tool_accuracy(c, ex.answer)
            self.rewarder.format = tool_format
        self.image_size = _image_size(image_size)
        if not isinstance(noise, (int, float)) or not 0 <= noise <= 0.5:
            raise TaskError(f"task rendered_arithmetic: noise={noise!r} must be a number in [0, 0.5]")
        self.noise = float(noise)
        self.fonts = font_set(fonts)
        for f in self.fonts:
            if f != PIL_DEFAULT and not Path(f).is_file():
                raise TaskError(f"task rendered_arithmetic: font file {f!r} does not exist")
        if not self.fonts:
            raise TaskError("task rendered_arithmetic: fonts=[] leaves no face to draw with")
        widest = f"{'8' * digits} * {'8' * digits}"
        for face in self.fonts:
            if _largest_size(face, widest, self.image_size) is None:
                raise TaskError(f"task rendered_arithmetic: image_size={list(self.image_size)} cannot "
                                f"hold {digits}-digit operands at {MIN_FONT_PX} px in "
                                f"{Path(face).name} (make it wider or taller)")

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` problems of `split` (arithmetic's split), each drawn with a rendering seed of
        its own whose lowest bit is the split: train and test never share an image."""
        return [self.rendered(ex, render_seed(self.name, split, seed, i))
                for i, ex in enumerate(super().examples(split, n, seed))]

    def pictures(self, split: str, n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
        """(picture, transcription "47 + 38") of the problems `examples(split, n, seed)` holds,
        drawn from the same rendering seeds, without the PNG round trip: what the vision
        tower's reading stage trains on (train/posttrain/tower_reading.py)."""
        out = []
        for i, ex in enumerate(super().examples(split, n, seed)):
            a, op, b = ex.meta["a"], ex.meta["op"], ex.meta["b"]
            out.append((self.picture_of(a, op, b, render_seed(self.name, split, seed, i))[0], f"{a} {op} {b}"))
        return out

    def picture_of(self, a: int, op: str, b: int, seed: int) -> tuple[Image.Image, dict]:
        """`render` with this task's size, faces, noise and style."""
        return render(a, op, b, seed, self.image_size, self.fonts, self.noise, plain=self.style == "plain")

    def rendered(self, ex: Example, seed: int) -> Example:
        """The arithmetic example with its picture and a demonstration that reads it first."""
        a, op, b = ex.meta["a"], ex.meta["op"], ex.meta["b"]
        image, drawn = self.picture_of(a, op, b, seed)
        meta = dict(ex.meta, image=png_bytes(image), image_sha256=content_hash(image), render=drawn)
        if self.target == "reading":
            reading = f"{a} {op} {b}"
            return Example(READ_PROMPT, reading, f"{ANSWER}{reading}{END_ANSWER}", meta)
        if self.target == "tool":
            value = str(apply(a, op, b))
            return Example(TOOL_PROMPT, value, None, dict(meta, turns=calculator_turns(f"{a} {op} {b}", value)))
        steps = {"+": add_steps, "-": sub_steps, "*": mul_steps}[op](a, b)
        response = r1_response("\n".join([f"The image shows {a} {op} {b}."] + steps), ex.answer)
        return Example(PROMPT, ex.answer, response, meta)

    def prompt_messages(self, example: Example) -> list[dict]:
        """The picture as an OpenAI image_url part (PNG data: URL), then the instruction;
        target "tool": the system's tool note, the instruction, then the picture, as
        `nanoseek agent --image` sends them (agent/loop.py)."""
        picture, text = image_url_part(example.meta["image"]), {"type": "text", "text": example.prompt}
        if self.target == "tool":
            return [{"role": "system", "content": self.system}, {"role": "user", "content": [text, picture]}]
        return [{"role": "user", "content": [picture, text]}]

    def messages(self, example: Example) -> list[dict]:
        """The conversation with its demonstration (target "tool": the call, the tool's
        output, the answer)."""
        if self.target == "tool":
            return self.prompt_messages(example) + example.meta["turns"]
        return super().messages(example)

    @staticmethod
    def image(example: Example) -> Image.Image:
        return decode_image(example.meta["image"]).image


def calculator_turns(expression: str, value: str) -> list[dict]:
    """The picture read into a calculator call, the tool's output, the answer."""
    call = {"id": "call_0", "type": "function", "function": {
        "name": "calculator", "arguments": json.dumps({"expression": expression})}}
    return [{"role": "assistant", "content": f"{THINK}\nThe image shows {expression}.\n{END_THINK}",
             "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": value},
            {"role": "assistant", "content": f"{ANSWER}{value}{END_ANSWER}"}]


def reading_of(completion: str) -> tuple[int, str, int] | None:
    """(a, op, b) the completion says it read off the picture, or None."""
    m = READING.search(completion)
    return (int(m[1]), m[2], int(m[3])) if m else None


def read_accuracy(completion: str, expected: str) -> float:
    """1.0 when the final answer is the transcription `expected` ("47 + 38"), spacing aside;
    exact, not mathematical: "38 + 47" is a misreading of 47 + 38."""
    given = answer_of(completion)
    return float(given is not None and given.split() == expected.split())


def render_seed(name: str, split: str, seed: int, index: int) -> int:
    """A 64-bit seed for the index-th image of (split, seed); even for train, odd for test."""
    h = int.from_bytes(hashlib.blake2b(f"{name}|{split}|{seed}|{index}".encode(), digest_size=8).digest(),
                       "big")
    return (h >> 1 << 1) | (split == "test")


def render(a: int, op: str, b: int, seed: int, size: tuple[int, int], fonts: tuple[str, ...],
           noise: float, plain: bool = False) -> tuple[Image.Image, dict]:
    """(RGB image, the style it was drawn in) of `a op b`, all choices from `seed`. plain:
    black on white, upright, no lines or blur, near the centre (face, size, noise still vary)."""
    rng = np.random.default_rng(seed)
    w, h = size
    face = fonts[int(rng.integers(len(fonts)))]
    tokens = [str(a), op, str(b)]
    top = _largest_size(face, f"{'8' * len(tokens[0])} * {'8' * len(tokens[2])}", size) or MIN_FONT_PX
    px = int(rng.integers(MIN_FONT_PX, top + 1))
    font = _font(face, px)
    gaps = [float(rng.uniform(0.15, 0.6)) * px for _ in range(2)]
    widths = [font.getlength(t) for t in tokens]
    span = sum(widths) + sum(gaps)
    x, y = _place(rng, w, h, span, px, spread=0.2 if plain else 1.0)
    bob = 0.0 if plain else 0.06
    mask = Image.new("L", size, 0)
    pen = ImageDraw.Draw(mask)
    for t, tw, gap in zip(tokens, widths, gaps + [0.0]):
        pen.text((x, y + float(rng.uniform(-bob, bob)) * px), t, fill=255, font=font, anchor="lm")
        x += tw + gap
    angle = 0.0 if plain else float(rng.uniform(-5, 5))
    if angle:
        mask = mask.rotate(angle, resample=Image.BICUBIC, center=(w / 2, h / 2))
    bg, fg = ((255, 255, 255), (0, 0, 0)) if plain else _colours(rng)
    canvas = Image.new("RGB", size, bg)
    if not plain:
        lines = ImageDraw.Draw(canvas)
        faint = tuple(int(0.75 * c + 0.25 * d) for c, d in zip(bg, fg))
        for _ in range(int(rng.integers(0, 3))):
            lines.line([(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)], fill=faint, width=1)
    canvas = Image.composite(Image.new("RGB", size, fg), canvas, mask)
    blur = 0.0 if plain else float(rng.uniform(0, 0.8)) if rng.random() < 0.5 else 0.0
    if blur:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    sigma = float(rng.uniform(0, noise)) * 255
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, sigma, (h, w, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
    style = {"seed": seed, "font": Path(face).stem if face != PIL_DEFAULT else face, "font_px": px,
             "angle": round(angle, 2), "background": list(bg), "foreground": list(fg),
             "blur": round(blur, 2), "noise_sigma": round(sigma, 2), "plain": plain}
    return image, style


def _place(rng, w: int, h: int, span: float, px: int, spread: float) -> tuple[float, float]:
    """Where the expression starts (x) and its middle line (y): anywhere it fits (spread 1)
    or within `spread` of the free room on either side of the centre."""
    x_lo, x_hi = 2.0, max(2.0, w - span - 2)
    y_lo, y_hi = px / 2 + 2, max(px / 2 + 2, h - px / 2 - 2)
    x_mid, y_mid = (x_lo + x_hi) / 2, (y_lo + y_hi) / 2
    return (float(rng.uniform(x_mid - spread * (x_mid - x_lo), x_mid + spread * (x_hi - x_mid))),
            float(rng.uniform(y_mid - spread * (y_mid - y_lo), y_mid + spread * (y_hi - y_mid))))


def _colours(rng) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(background, ink) with a luminance gap of at least 110 of 255: dark on light mostly."""
    def lum(c):
        return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    dark_background = rng.random() < 0.3
    while True:
        bg = tuple(int(v) for v in (rng.integers(0, 90, 3) if dark_background else rng.integers(160, 256, 3)))
        fg = tuple(int(v) for v in (rng.integers(170, 256, 3) if dark_background else rng.integers(0, 110, 3)))
        if abs(lum(bg) - lum(fg)) >= 110:
            return bg, fg


@functools.lru_cache(maxsize=4096)
def _largest_size(face: str, text: str, size: tuple[int, int]) -> int | None:
    """The largest pixel size at which `text` (with its widest gaps) fits `size` with a margin."""
    w, h = size
    best = None
    for px in range(MIN_FONT_PX, h + 1):
        if _font(face, px).getlength(text) + 1.2 * px + 8 > w or px * 1.25 + 4 > h:
            break
        best = px
    return best


@functools.lru_cache(maxsize=512)
def _font(face: str, px: int):
    return ImageFont.load_default(size=px) if face == PIL_DEFAULT else ImageFont.truetype(face, px)


def font_set(fonts) -> tuple[str, ...]:
    """The faces `fonts` names: "bundled" (None too), "system", or a list of TTF paths and
    PIL_DEFAULT."""
    if fonts is None or fonts in FONT_SETS:
        return _found_fonts(fonts == "system")
    if isinstance(fonts, (list, tuple)) and all(isinstance(f, str) for f in fonts):
        return tuple(fonts)
    raise TaskError(f"task rendered_arithmetic: fonts={fonts!r} must be one of {FONT_SETS} or a list of "
                    f"TTF paths (and {PIL_DEFAULT!r})")


@functools.lru_cache(maxsize=2)
def _found_fonts(system: bool) -> tuple[str, ...]:
    """The text faces in matplotlib's data (and, with `system`, under FONT_DIRS), one file per
    name, sorted by name, then PIL's default face (always there)."""
    dirs = [Path(d) for d in FONT_DIRS] if system else []
    spec = importlib.util.find_spec("matplotlib")  # its data directory, without importing it
    if spec and spec.submodule_search_locations:
        dirs += [Path(p) / "mpl-data" / "fonts" / "ttf" for p in spec.submodule_search_locations]
    found = {}
    for d in dirs:
        if d.is_dir():
            for path in sorted(d.rglob("*.ttf")):
                if FONT_NAME.fullmatch(path.name):
                    found.setdefault(path.name, str(path))
    return tuple(found[k] for k in sorted(found)) + (PIL_DEFAULT,)


def _image_size(value) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(size) != 2 or not all(isinstance(v, int) and 16 <= v <= 2048 for v in size):
        raise TaskError(f"task rendered_arithmetic: image_size={value!r} must be [width, height] "
                        "(or one side), integers in [16, 2048]")
    return size
