"""`nanoseek sft` with images: a tiny DeepSeek-VL (`--vision tiny-vl` around a micro MLA
language model) learns from chat rows with pictures; the vision tower stays bit-identical
unless --train-vision; the ids are the engine's; bad rows and paths outside the JSONL's
directory are refused by name; the run resumes; transformers reads the checkpoint."""

import base64
import json

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from nanoseek.cli import app
from nanoseek.data.chat import ChatDataError
from nanoseek.data.chat_images import ImageConversation, encode_conversation, image_windows
from nanoseek.model import CausalLM
from nanoseek.model.vl import DeepseekVLForConditionalGeneration
from nanoseek.model.vl.vl_build import vl_from_text
from nanoseek.model.vl.vl_image import image_processor
from nanoseek.text.images import png_bytes
from nanoseek.text.tokenizer import Tokenizer, load_tokenizer
from nanoseek.train.loop import read_metrics
from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
from nanoseek.train.posttrain.vision_sft import VisionSFTError
from tests.posttrain_utils import make_init, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(progress=False, log=lambda *a: None)


def picture(text: str, colour=(0, 0, 0)) -> Image.Image:
    im = Image.new("RGB", (64, 32), (255, 255, 255))
    ImageDraw.Draw(im).text((6, 8), text, fill=colour)
    return im


def data_url(im: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(im)).decode()


def image_row(url: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What does it say?"}]},
        {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return make_init(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four pictures: two inline, two as paths relative to the JSONL file (one in a subfolder)."""
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    picture("cat").save(d / "cat.png")
    picture("cow", (200, 0, 0)).save(d / "img" / "cow.png")
    rows = [image_row(data_url(picture("dog")), "Dog."), image_row("cat.png", "Cat."),
            image_row(data_url(picture("red", (255, 0, 0))), "Red."), image_row("img/cow.png", "Cow.")]
    return write_jsonl(d / "vision.jsonl", rows)


def config(init, data, **kw):
    train = dict(max_steps=8, batch_size=2, seq_len=128, lr=1e-2, warmup_steps=2, save_every=100)
    train.update(kw.pop("train", {}))
    return SFTConfig(init=str(init), data=[str(data)], **{"vision": "tiny-vl", **kw},
                     train=sft_train_config(**train))


def fresh_vl(init, seed=1337):
    return vl_from_text(CausalLM.from_pretrained(init), load_tokenizer(init), "tiny-vl", seed)[0]


def test_loss_falls_vision_frozen_aligner_and_language_learn(tmp_path, init, data):
    run = sft(tmp_path, config(init, data), **QUIET)
    assert run["loss_after"] < run["loss_before"] * 0.7
    assert run["data"]["images"] == 4 and run["data"]["image_tokens"] == 36
    counts = run["trainable_parameters"]
    assert counts["vision"] == 0 and counts["aligner"] > 0 and counts["language"] > 0
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(train) == 8 and train[-1]["lm_loss"] < train[0]["lm_loss"]
    before, after = fresh_vl(init).state_dict(), DeepseekVLForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    vision = [k for k in before if k.startswith("vision_model.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert not torch.equal(before["aligner.linear1.weight"], after["aligner.linear1.weight"])
    assert load_tokenizer(tmp_path).convert_tokens_to_ids("<image_placeholder>") == 384
    assert image_processor(tmp_path).size.height == 96  # preprocessor_config.json beside it


def test_train_vision_changes_the_tower(tmp_path, init, data):
    run = sft(tmp_path, config(init, data, train_vision=True, train={"max_steps": 3}), **QUIET)
    assert run["trainable_parameters"]["vision"] > 0
    before, after = fresh_vl(init).state_dict(), DeepseekVLForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    changed = [k for k in before if k.startswith("vision_model.") and not torch.equal(before[k], after[k])]
    assert "vision_model.embeddings.patch_embedding.weight" in changed
    pooling = {k: v for k, v in before.items() if k.startswith("vision_model.head.")}
    tower = sum(v.numel() for k, v in before.items() if k.startswith("vision_model.") and k not in pooling)
    assert pooling and run["trainable_parameters"]["vision"] == tower  # the unused pooling head is not counted
    assert not any(k in changed for k in pooling)


def test_checkpoint_reads_in_transformers_with_the_same_logits(tmp_path, init, data):
    from transformers import DeepseekVLForConditionalGeneration as HF
    sft(tmp_path, config(init, data, train={"max_steps": 2}), **QUIET)
    ours = DeepseekVLForConditionalGeneration.from_pretrained(tmp_path)
    theirs = HF.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[0, 3] + [384] * 36 + [40, 41, 4]])
    px = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        diff = (theirs(input_ids=ids, pixel_values=px).logits - ours(ids, pixel_values=px)).abs().max()
    assert diff < 1e-4


def test_the_ids_are_the_engines(init, data):
    """A row's prompt encodes as the server writes it (chat_parts with the model's placeholder,
    Tokenizer.encode_chat) with each placeholder expanded to the image's 36 tokens."""
    from nanoseek.model.vl.vl_layout import expand_image_placeholders
    tok = load_tokenizer(init)
    row = image_row("cat.png", "Cat.")["messages"]
    ids, trained = encode_conversation(ImageConversation(row, "row"), tok, 384, 36)
    served = Tokenizer.of(tok).encode_chat(row[:1], add_generation_prompt=True, image_token_id=384)
    assert ids[:len(served) + 35] == expand_image_placeholders(served, 384, 36)
    assert ids.count(384) == 36 and not any(w for t, w in zip(ids, trained) if t == 384)
    assert any(trained)


def test_packing_keeps_each_rows_images_with_it(init, data):
    """Three rows per window: the window's placeholder runs and its images match one for one,
    in order, and a batch's pixels follow its rows."""
    tok = load_tokenizer(init)
    convs = [ImageConversation(image_row(data_url(picture(w)), w)["messages"], f"row {i}")
             for i, w in enumerate(["a", "bb", "ccc", "dddd", "e"])]
    win = image_windows(convs, tok, 200, 384, 36, image_processor(None, 96), 96)
    assert [len(w) for w in win.window_images] == [3, 2]
    assert win.window_images == [[0, 1, 2], [3, 4]]
    for w, imgs in enumerate(win.window_images):
        assert int((win.inputs[w] == 384).sum()) == 36 * len(imgs)
    x, y, px = win.take([1, 0])
    assert px.shape == (5, 3, 96, 96)
    first = image_windows(convs[3:4], tok, 200, 384, 36, image_processor(None, 96), 96).take([0])[2]
    assert torch.equal(px[0], first[0])
    with pytest.raises(ChatDataError, match=r"row 0: \d+ tokens with its 1 image\(s\).*--seq-len"):
        image_windows(convs[:1], tok, 30, 384, 36, image_processor(None, 96), 96)


@pytest.mark.parametrize("url, message", [
    ("../outside.png", "'..' is not allowed"),
    ("/etc/hostname", "not a file under the allowed image directory"),
    ("http://example.com/a.png", "never fetched from the network"),
    ("missing.png", "no image file"),
    ("data:image/png;base64,AAAA", "image"),
])
def test_bad_image_rows_are_refused_by_row(tmp_path, init, url, message):
    (tmp_path / "outside.png").write_bytes(png_bytes(picture("x")))
    (tmp_path / "d").mkdir()
    rows = write_jsonl(tmp_path / "d" / "rows.jsonl", [image_row(data_url(picture("ok")), "Ok."),
                                                        image_row(url, "No.")])
    with pytest.raises(ChatDataError, match=rf"rows.jsonl:2: image 0: .*{message}"):
        sft(tmp_path / "run", config(init, rows), **QUIET)


def test_refusals_name_what_is_wrong(tmp_path, init, data):
    text_only = SFTConfig(init=str(init), data=[str(data)], train=sft_train_config(max_steps=1, seq_len=64))
    with pytest.raises(VisionSFTError, match=r"vision.jsonl:1: the row holds an image.*text-only.*--vision tiny-vl"):
        sft(tmp_path / "a", text_only, **QUIET)
    text_only.train_vision = True
    with pytest.raises(VisionSFTError, match="--train-vision: .* text-only model"):
        sft(tmp_path / "b", text_only, **QUIET)
    from nanoseek.train.posttrain.lora import LoraSettings
    with pytest.raises(VisionSFTError, match="--lora/--qlora with a vision-language model is not supported"):
        sft(tmp_path / "c", config(init, data, lora=LoraSettings(r=4)), **QUIET)
    with pytest.raises(VisionSFTError, match="unknown vision preset 'huge'"):
        sft(tmp_path / "d", config(init, data, vision="huge"), **QUIET)
    rows = write_jsonl(tmp_path / "e.jsonl", [{"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}]}])
    with pytest.raises(ChatDataError, match=r"e.jsonl:1: message 1 holds an image"):
        sft(tmp_path / "f", config(init, rows), **QUIET)


def test_resumes_to_the_same_weights(tmp_path, init, data):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    steady = {"save_every": 3, "schedule": "constant", "max_steps": 6}
    sft(whole, config(init, data, train=steady), **QUIET)
    sft(parts, config(init, data, train={**steady, "max_steps": 3}), **QUIET)
    sft(parts, config(init, data, train={**steady, "max_steps": 3}), resume=True, max_steps=6, **QUIET)
    a = DeepseekVLForConditionalGeneration.from_pretrained(whole).state_dict()
    b = DeepseekVLForConditionalGeneration.from_pretrained(parts).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(parts) if r["kind"] == "train"] == list(range(1, 7))


def test_cli_task_rendered_arithmetic(tmp_path, init):
    """`nanoseek sft --vision tiny-vl --task rendered_arithmetic --option target=reading`; a
    text-only model on the same task is refused."""
    runner = CliRunner()
    common = ["sft", "--model", str(init), "--task", "rendered_arithmetic", "--task-examples", "4",
              "--option", "digits=1", "--option", "target=reading", "--max-steps", "2",
              "--seq-len", "128", "--batch-size", "2", "--no-progress"]
    r = runner.invoke(app, common + ["--out", str(tmp_path / "run"), "--vision", "tiny-vl", "--train-vision"])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["train_vision"] and run["trainable_parameters"]["vision"] > 0
    r = runner.invoke(app, common + ["--out", str(tmp_path / "text")])
    assert r.exit_code == 2 and "each prompt holds an image" in r.output and "--vision tiny-vl" in r.output


def test_the_engine_reads_the_trained_checkpoint_as_it_was_trained(tmp_path, init, data):
    """The server's prompt (one placeholder per picture) and the decoded picture, given to
    nanoseek's engine over the run directory, decode greedily as the model's own generate on
    the ids and pixels training used."""
    from nanoseek.data.chat_images import conversation_images, read_image_conversations
    from nanoseek.engine import LLM, SamplingParams
    from nanoseek.model.vl.vl_image import preprocess
    from nanoseek.model.vl.vl_layout import expand_image_placeholders
    from nanoseek.text.images import ImageLimits
    sft(tmp_path, config(init, data, train={"max_steps": 2}), **QUIET)
    conv = read_image_conversations([data])[1]  # the picture given as a path relative to the file
    prompt = ImageConversation(conv.messages[:1], conv.where, conv.image_dir)
    tok = load_tokenizer(tmp_path)
    served = Tokenizer.of(tok).encode_chat(prompt.messages, add_generation_prompt=True, image_token_id=384)
    ids = encode_conversation(prompt, tok, 384, 36)[0]  # training's ids of the same turn
    assert ids == expand_image_placeholders(served, 384, 36)
    picture = [s.load(ImageLimits()) for s in conversation_images(prompt, ImageLimits())]
    model = DeepseekVLForConditionalGeneration.from_pretrained(tmp_path)
    px = preprocess(picture, image_processor(tmp_path))
    want = model.generate(torch.tensor([ids]), px, max_new_tokens=6)[0, len(ids):].tolist()
    with torch.no_grad():
        first = model(torch.tensor([ids]), pixel_values=px)[0, -1].log_softmax(-1)[want[0]]
    llm = LLM(str(tmp_path), max_num_seqs=1, max_num_batched_tokens=64)
    out = llm.generate([{"prompt_token_ids": served, "images": picture}],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want
    assert abs(out.logprobs[0][want[0]] - float(first)) < 1e-5  # the picture's pixels too


def test_the_model_learns_to_look(tmp_path, init):
    """Black pictures answer "Red.", white ones "Cow.", the text alike: after training the
    loss with the right pictures is far below the loss with the two swapped (the pixels
    reach the answer through tower, aligner and placeholders)."""
    import torch.nn.functional as F

    from nanoseek.data.chat_images import read_image_conversations
    rows = [image_row(data_url(Image.new("RGB", (64, 32), c)), a)
            for c, a in [((0, 0, 0), "Red."), ((255, 255, 255), "Cow.")]] * 4
    data = write_jsonl(tmp_path / "bw.jsonl", rows)
    steady = {"max_steps": 60, "batch_size": 8, "schedule": "constant", "lr": 3e-3}
    sft(tmp_path / "run", config(init, data, packing=False, train_vision=True, train=steady), **QUIET)
    model = DeepseekVLForConditionalGeneration.from_pretrained(tmp_path / "run")
    win = image_windows(read_image_conversations([data]), load_tokenizer(init), 64, 384, 36,
                        image_processor(None, 96), 96, packing=False)
    x, y, px = win.take([0, 1])
    with torch.no_grad():
        def loss(p):
            return float(F.cross_entropy(model(x, pixel_values=p).flatten(0, 1), y.flatten(), ignore_index=-100))
        assert loss(px) < loss(px.flip(0)) / 3


def test_feature_spread_tells_apart_pictures_and_a_collapsed_tower(init):
    """bench_vision's `feature_spread`: zero when every picture gives the same image rows
    (a tower trained into one constant prompt), clearly above zero for the random tower on
    two different pictures."""
    from benchmarks.bench_vision import feature_spread
    from nanoseek.model.vl.vl_image import preprocess
    model = fresh_vl(init)
    two = preprocess([picture("12 + 34"), picture("56 * 78")], image_processor(None, 96), max_images=2)
    assert feature_spread(model, two) > 0.02
    assert feature_spread(model, two[:1].expand(2, -1, -1, -1)) < 1e-6
