"""Chat image parts at the live server (serve/images.py): each refusal a 400 naming its limit
and the option that sets it, network URLs never fetched, file URLs only under --image-dir,
a text-only model's 400, a vision-language checkpoint whose engine runs its language model
alone a 501, tiny DeepSeek-VL (MLA; Llama GQA) and DeepSeek-OCR-2 engines answering as their
own generate does for the same ids and image, and the response caches keying an image by its content hash (never its URL;
L1 and L2)."""

from __future__ import annotations

import base64
import io
import json
import socket

import httpx2 as httpx
import pytest
import torch
from PIL import Image

from nanoseek.serve import images as serve_images
from nanoseek.serve.cache import ResponseCache
from nanoseek.serve.cache.memory import MemoryStore
from nanoseek.serve.params import cache_key
from nanoseek.serve.protocol import ChatCompletionRequest
from nanoseek.text.images import ImageLimits, decode_image, image_url_part, png_bytes
from tests.test_server import MODEL, Live, ckpt, make_app  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = ImageLimits(max_images=2, max_bytes=6000, max_pixels=48 * 48, max_side=64)


def picture(colour=(200, 30, 30), size=(16, 12)) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(colour, (2, 2, 10, 8))
    return img


def png_part(img: Image.Image) -> dict:
    return image_url_part(png_bytes(img))


def webp_part(img: Image.Image) -> dict:
    out = io.BytesIO()
    img.save(out, format="WEBP", lossless=True)
    return {"type": "image_url", "image_url": {"url": "data:image/webp;base64," + base64.b64encode(out.getvalue()).decode()}}


def asking(*parts, question="What is in the picture?", **kw) -> dict:
    content = [{"type": "text", "text": question}, *parts]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0, **kw}


class Recording:
    """A ResponseCache that keeps every key it is handed (to show what keys hold)."""

    def __init__(self):
        self.cache, self.keys = ResponseCache(MemoryStore()), []

    def lookup(self, key):
        self.keys.append(key)
        return self.cache.lookup(key)

    def store(self, key, response):
        self.keys.append(key)
        self.cache.store(key, response)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    picture().save(d / "red.png")
    return d


@pytest.fixture(scope="module")
def server(ckpt, image_dir):  # noqa: F811
    recording = Recording()
    live = Live(make_app(ckpt, image_limits=LIMITS, image_dir=image_dir, response_cache=recording))
    live.recording = recording
    yield live
    live.stop()


def post(server, body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def refusal(server, body, status=400) -> dict:
    r = post(server, body)
    assert r.status_code == status, r.text
    return r.json()["error"]


# ------------------------------------------------------------------ refusals
def test_a_text_only_model_says_it_reads_text_only(server):
    err = refusal(server, asking(png_part(picture())))
    assert err["code"] == "images_not_supported" and "reads text only" in err["message"]
    assert err["param"] == "messages"
    # the openai client sees the same 400
    import openai
    with pytest.raises(openai.BadRequestError, match="reads text only"):
        server.client().chat.completions.create(**asking(png_part(picture())))
    # text parts alone still work
    ok = post(server, asking())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("part, limit, option", [
    (png_part(picture(size=(65, 2))), "max_side", None),
    (png_part(picture(size=(60, 60))), "max_pixels", "--max-image-pixels"),
    (png_part(Image.effect_noise((60, 60), 80).convert("RGB")), "max_bytes", "--max-image-bytes"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}, "image_data_url", None),
    ({"type": "image_url", "image_url": {"url": "data:text/html;base64,PGI+"}}, "image_format", None),
])
def test_each_limit_is_a_400_naming_it(server, part, limit, option):
    err = refusal(server, asking(part))
    assert err["code"] == limit and err["param"] == "messages.0.content.1"
    assert f"({limit})" in err["message"] or limit.startswith("image_")
    if option:
        assert option in err["message"]


def test_too_many_images_are_refused_before_any_is_read(server):
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}  # never decoded
    err = refusal(server, asking(bad, bad, bad))
    assert err["code"] == "max_images" and "3 images" in err["message"] and "--max-images-per-request" in err["message"]


def test_network_urls_are_never_fetched(server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.3)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
    err = refusal(server, asking({"type": "image_url", "image_url": {"url": url}}))
    assert err["code"] == "image_url_scheme" and "never fetched" in err["message"]
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected
    listener.close()


def test_file_urls_only_under_the_image_dir(server, image_dir, tmp_path):
    inside = {"type": "image_url", "image_url": {"url": (image_dir / "red.png").as_uri()}}
    assert refusal(server, asking(inside))["code"] == "images_not_supported"  # read: past the limits
    picture().save(tmp_path / "outside.png")
    outside = {"type": "image_url", "image_url": {"url": (tmp_path / "outside.png").as_uri()}}
    err = refusal(server, asking(outside))
    assert err["code"] == "image_dir" and "not a file under the allowed image directory" in err["message"]


def test_file_urls_are_refused_without_an_image_dir(ckpt, image_dir):  # noqa: F811
    live = Live(make_app(ckpt))
    try:
        part = {"type": "image_url", "image_url": {"url": (image_dir / "red.png").as_uri()}}
        err = refusal(live, asking(part))
        assert err["code"] == "image_dir" and "--image-dir" in err["message"]
    finally:
        live.stop()


def test_a_malformed_image_part_names_the_field(server):
    err = refusal(server, asking({"type": "image_url", "image_url": {"href": "x"}}))
    assert err["param"] == "messages.0.content.1.image_url.url"


def test_a_vision_checkpoint_served_as_text_is_a_501(server):
    """A DeepSeek-VL checkpoint whose engine was built on its language model alone cannot
    see the image."""
    state = server.app.state
    assert state.vision is None  # the tiny model reads text only
    state.vision = "DeepseekVLForConditionalGeneration"
    try:
        err = refusal(server, asking(png_part(picture())), status=501)
    finally:
        state.vision = None
    assert err["code"] == "images_not_served" and "runs its language model alone" in err["message"]
    assert "DeepseekVLForConditionalGeneration" in err["message"]


def test_served_vision_knows_the_vision_models(tmp_path):
    class Engine:
        model = object()

    class LLM:
        engine = Engine()
    assert serve_images.served_vision(LLM()) is None
    assert serve_images.served_vision(LLM(), tmp_path) is None  # no config.json: a text model
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DeepseekVLForConditionalGeneration"]}))
    assert serve_images.served_vision(LLM(), tmp_path) == "DeepseekVLForConditionalGeneration"

    class VL:
        vision_model = object()
    Engine.model = VL()
    assert serve_images.served_vision(LLM()) == "VL"


# ------------------------------------------------------------------ a DeepSeek-VL engine
IMG = 310  # the image placeholder: an id the text tokenizer (vocab 300) never writes


@pytest.fixture(scope="module")
def vl(ckpt):  # noqa: F811
    """A tiny random DeepSeek-VL (MLA/MoE language model, tests/test_engine_vl.py) served with
    the text checkpoint's tokenizer, and a second engine on the same model for reference."""
    from nanoseek.engine import LLM, AsyncLLM
    from nanoseek.serve.app import create_app
    from nanoseek.text.tokenizer import Tokenizer
    from tests.test_engine_vl import MLA_MOE, vl_model
    model = vl_model({**MLA_MOE, "vocab_size": 320, "max_position_embeddings": 256})
    model.config.image_token_id = IMG
    tok = Tokenizer.from_dir(ckpt)
    recording = Recording()
    live = Live(create_app(AsyncLLM(model, tok, kv_cache_memory=2**22, speculative=False), MODEL,
                           image_limits=LIMITS, response_cache=recording, cache_scope="shared"))
    live.recording, live.offline, live.tok = recording, LLM(model, tok, kv_cache_memory=2**22, speculative=False), tok
    yield live
    live.stop()


def l1_hits(server) -> float:
    return server.metrics().get(("nanoseek_response_cache_hits_total", (("level", "l1"),)), 0)


def test_a_vision_language_engine_answers_as_its_own_generate(vl):
    """The chat is rendered with one placeholder where the image stood, the image goes to
    the engine with it, and the greedy answer is the engine's own for those ids and image."""
    from nanoseek.engine import SamplingParams
    assert vl.app.state.vision == "DeepseekVLForConditionalGeneration"
    red, blue = picture(), picture(colour=(20, 40, 220))
    body = asking(png_part(red), max_tokens=6)
    r = post(vl, body)
    assert r.status_code == 200, r.text
    ids = vl.tok.encode_chat([{"role": "user", "content": body["messages"][0]["content"]}],
                             add_generation_prompt=True, image_token_id=IMG)
    text_ids = vl.tok.encode_chat([{"role": "user", "content": "What is in the picture?"}], add_generation_prompt=True)
    assert ids.count(IMG) == 1 and [t for t in ids if t != IMG] == text_ids  # the image after the text
    greedy = SamplingParams(temperature=0, max_tokens=6)
    want = [vl.offline.generate({"prompt_token_ids": ids, "images": [decode_image(png_bytes(img))]}, greedy)[0]
            for img in (red, blue)]
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == want[0].outputs[0].text
    assert answer["usage"]["prompt_tokens"] == len(want[0].prompt_token_ids) == len(ids) + 15  # 16 per image
    assert want[0].outputs[0].token_ids != want[1].outputs[0].token_ids  # the answer depends on the image
    other = post(vl, asking(png_part(blue), max_tokens=6))
    assert other.json()["choices"][0]["message"]["content"] == want[1].outputs[0].text
    system = {"role": "system", "content": [{"type": "text", "text": "Look."}, png_part(red)]}
    err = refusal(vl, {**body, "messages": [system, *body["messages"]]})
    assert err["code"] == "image_role" and "user messages only" in err["message"]
    assert err["param"] == "messages.0.content.1"


@pytest.fixture(scope="module", params=["llama-gqa", "ocr2"])
def mha_vl(request, ckpt):  # noqa: F811
    """A tiny DeepSeek-VL with a Llama (GQA) language model, or a tiny DeepSeek-OCR-2 (MHA
    DeepSeekMoE; tests/test_engine_vl_mha.py), served with the text checkpoint's tokenizer."""
    from nanoseek.engine import LLM, AsyncLLM
    from nanoseek.serve.app import create_app
    from nanoseek.text.tokenizer import Tokenizer
    if request.param == "llama-gqa":
        from tests.test_engine_vl import vl_model
        from tests.test_engine_vl_mha import LLAMA
        model = vl_model({**LLAMA, "vocab_size": 320, "max_position_embeddings": 256})
    else:
        from nanoseek.model.vl.ocr2_config import from_hf_json
        from nanoseek.model.vl.ocr2_model import DeepseekOCR2
        from tests.test_ocr2_model import tiny_config
        raw = tiny_config().to_dict()
        raw["text_config"]["vocab_size"] = 320
        torch.manual_seed(0)
        model = DeepseekOCR2(from_hf_json(raw)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if name.startswith("language") else 0.05))
    model.config.image_token_id = IMG
    tok = Tokenizer.from_dir(ckpt)
    live = Live(create_app(AsyncLLM(model, tok, kv_cache_memory=2**23, speculative=False), MODEL,
                           image_limits=LIMITS))
    live.offline, live.tok = LLM(model, tok, kv_cache_memory=2**23, speculative=False), tok
    yield live
    live.stop()


def test_mha_vision_language_engines_answer_as_their_own_generate(mha_vl):
    """No 501 for MHA/GQA language models: the answer and the usage are the engine's own for
    the chat's ids and the image (OCR-2's image tokens: the global view's 256 + 1 separator)."""
    from nanoseek.engine import SamplingParams
    body = asking(png_part(picture()), max_tokens=5)
    r = post(mha_vl, body)
    assert r.status_code == 200, r.text
    ids = mha_vl.tok.encode_chat([{"role": "user", "content": body["messages"][0]["content"]}],
                                 add_generation_prompt=True, image_token_id=IMG)
    want = mha_vl.offline.generate({"prompt_token_ids": ids, "images": [decode_image(png_bytes(picture()))]},
                                   SamplingParams(temperature=0, max_tokens=5))[0]
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == want.outputs[0].text
    per_image = 16 if mha_vl.app.state.vision == "DeepseekVLForConditionalGeneration" else 257
    assert answer["usage"]["prompt_tokens"] == len(want.prompt_token_ids) == len(ids) - 1 + per_image


def test_a_request_of_n_samples_preprocesses_its_picture_once(vl, monkeypatch):
    """Counted for the context, then n engine requests: one preprocessing (off the event loop)."""
    import nanoseek.engine.vision as vision
    calls, preprocess = [], vision.preprocess
    monkeypatch.setattr(vision, "preprocess", lambda pil, proc: (calls.append(len(pil)), preprocess(pil, proc))[1])
    r = post(vl, asking(png_part(picture(colour=(3, 140, 250))), n=3, temperature=1.0, seed=5))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3 and calls == [1]


def test_a_picture_the_models_preprocessing_refuses_is_a_400(mha_vl):
    """OCR-2 counts an image's tokens with its processor (the handler's `engine_prompt`): a
    strip too thin for its global view is refused by name, not a 500."""
    from nanoseek.serve.errors import APIError
    from nanoseek.serve.images import engine_prompt
    strip = decode_image(png_bytes(Image.new("RGB", (2000, 1), (9, 9, 9))))
    llm = mha_vl.offline
    ids = [5, llm.engine.vision.image_token_id, 6]
    if mha_vl.app.state.vision == "DeepseekVLForConditionalGeneration":
        assert engine_prompt(llm, ids, [strip])[1] == 2 + 16  # SigLIP resizes to its square
        return
    with pytest.raises(APIError) as e:
        engine_prompt(llm, ids, [strip])
    assert e.value.status == 400 and e.value.code == "image_unsupported" and "too elongated" in str(e.value)


def test_the_response_cache_keys_an_image_by_its_content(vl):
    """The same picture again, as PNG or WebP, is one L1 entry; another picture with the same
    text is another; no key holds the URL."""
    before = l1_hits(vl)
    red, blue = picture(colour=(30, 160, 40)), picture(colour=(240, 200, 10))
    first = post(vl, asking(png_part(red)))
    assert first.status_code == 200, first.text
    again = post(vl, asking(png_part(red)))
    assert l1_hits(vl) == before + 1 and again.json()["choices"] == first.json()["choices"]  # a hit
    assert post(vl, asking(webp_part(red))).status_code == 200
    assert l1_hits(vl) == before + 2  # same pixels, another container: a hit
    assert post(vl, asking(png_part(blue))).status_code == 200
    assert l1_hits(vl) == before + 2  # another picture: a miss
    keys = json.dumps(vl.recording.keys)
    assert "base64" not in keys and "data:" not in keys
    assert decode_image(png_bytes(red)).sha256 in keys and decode_image(png_bytes(blue)).sha256 in keys


# ------------------------------------------------------------------ cache keys
def key_of(body, images):
    return cache_key("chat", ChatCompletionRequest(**body), "shared", "ckpt", images)


def test_cache_key_needs_every_image_decoded():
    red = decode_image(png_bytes(picture()))
    with pytest.raises(ValueError, match="keyed by content"):
        key_of(asking(png_part(picture())), [])
    with pytest.raises(ValueError, match="more decoded images"):
        key_of(asking(), [red])


def test_l2_never_matches_across_images():
    """An image in an earlier turn is part of L2's exact context (by hash); a question
    whose last message holds an image is never matched by meaning."""
    import numpy as np
    pytest.importorskip("faiss")
    from nanoseek.serve.cache.semantic import SemanticIndex
    cache = ResponseCache(MemoryStore(), SemanticIndex(4, threshold=0.5), embedder=lambda text: np.ones(4) / 2)
    red, blue = picture(), picture(colour=(20, 40, 220))
    loaded = {id(red): decode_image(png_bytes(red)), id(blue): decode_image(png_bytes(blue))}

    def turn(img, question):
        body = asking(png_part(img), question="Look.")
        body["messages"] += [{"role": "assistant", "content": "Seen."}, {"role": "user", "content": question}]
        return key_of(body, [loaded[id(img)]])
    cache.store(turn(red, "What colour is it?"), {"answer": "red"})
    assert cache.lookup(turn(red, "Which colour is that?"))["_cache"] == "l2"  # same image, a paraphrase
    assert cache.lookup(turn(blue, "Which colour is that?")) is None        # another image: another context
    cache.store(key_of(asking(png_part(red)), [loaded[id(red)]]), {"answer": "a red box"})
    assert cache.lookup(key_of(asking(png_part(red), question="What does it show?"), [loaded[id(red)]])) is None


def test_cli_defaults_are_the_servers():
    import inspect

    from nanoseek.cli.serve import serve
    opts = inspect.signature(serve).parameters
    limits = serve_images.SERVER_LIMITS
    assert opts["max_image_bytes"].default.default == limits.max_bytes
    assert opts["max_images_per_request"].default.default == limits.max_images
    assert opts["max_image_pixels"].default.default == limits.max_pixels
