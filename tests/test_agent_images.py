"""Images in the agent (issue 29 §5): LLM.chat with image parts (equal to LLM.generate with the
expanded ids and the decoded image), `nanoseek agent --image FILE` against a served tiny
DeepSeek-VL (MLA) checkpoint and a text-only one, the `look` vision tool for text-only models
through a real server on 127.0.0.1, and trajectories that record each image a step saw by
content hash, never its bytes."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image

from nanoseek.agent import Agent
from nanoseek.agent.images import image_format, pick_image, read_images
from nanoseek.agent.tools.vision import LOOK, check_endpoint, look_tool
from nanoseek.engine.chat_images import ImagePartError, TextOnlyModelError
from nanoseek.text.images import ImageInputError, ImageLimits, decode_image, image_url_part, png_bytes
from tests.agent_mock import call, mock_endpoint
from tests.test_server import MODEL, Live, ckpt, make_app  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
IMG = 310  # the image placeholder: an id the text tokenizer (vocab 300) never writes
GREEDY = dict(temperature=0, max_tokens=6)


def picture(colour=(200, 30, 30), size=(16, 12)) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(colour, (2, 2, 10, 8))
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    picture().save(d / "red.png")
    picture(colour=(20, 40, 220)).save(d / "blue.jpg", quality=95)
    return d


@pytest.fixture(scope="module")
def vl(ckpt):  # noqa: F811
    """A tiny random DeepSeek-VL (MLA/MoE language model) served on 127.0.0.1 with the text
    checkpoint's tokenizer, and an offline LLM on the same model."""
    from nanoseek.engine import LLM, AsyncLLM
    from nanoseek.serve.app import create_app
    from nanoseek.text.tokenizer import Tokenizer
    from tests.test_engine_vl import MLA_MOE, vl_model
    model = vl_model({**MLA_MOE, "vocab_size": 320, "max_position_embeddings": 2048})
    model.config.image_token_id = IMG
    tok = Tokenizer.from_dir(ckpt)
    live = Live(create_app(AsyncLLM(model, tok, kv_cache_memory=2**22, speculative=False), MODEL))
    live.offline = LLM(model, tok, kv_cache_memory=2**22, speculative=False)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def text_server(ckpt):  # noqa: F811
    live = Live(make_app(ckpt))
    yield live
    live.stop()


def asking(img: Image.Image, question="What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, image_url_part(png_bytes(img))]}]


# ------------------------------------------------------------------ LLM.chat
def test_llm_chat_equals_generate_with_the_expanded_ids(vl):
    from nanoseek.engine import SamplingParams
    llm, greedy = vl.offline, SamplingParams(**GREEDY)
    red, blue = picture(), picture(colour=(20, 40, 220))
    got = [llm.chat(asking(img), greedy, use_tqdm=False)[0] for img in (red, blue)]
    ids = llm.tokenizer.encode_chat(asking(red), add_generation_prompt=True, image_token_id=IMG)
    T = llm.engine.vision.tokens_per_image
    expanded = [x for t in ids for x in ([t] * T if t == IMG else [t])]
    for img, out in zip((red, blue), got):
        want = llm.generate({"prompt_token_ids": expanded, "images": [decode_image(png_bytes(img)).image]},
                            greedy, use_tqdm=False)[0]
        assert out.prompt_token_ids == want.prompt_token_ids == expanded
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
    assert got[0].outputs[0].token_ids != got[1].outputs[0].token_ids  # the image matters
    two = [{"role": "user", "content": [asking(red)[0]["content"][0], image_url_part(png_bytes(red)),
                                        image_url_part(png_bytes(blue))]}]
    ids = llm.tokenizer.encode_chat(two, add_generation_prompt=True, image_token_id=IMG)
    expanded = [x for t in ids for x in ([t] * T if t == IMG else [t])]
    in_order, swapped = (llm.generate({"prompt_token_ids": expanded, "images": [decode_image(png_bytes(a)).image,
                                                                                decode_image(png_bytes(b)).image]},
                                      greedy, use_tqdm=False)[0].outputs[0].token_ids for a, b in ((red, blue), (blue, red)))
    assert llm.chat(two, greedy, use_tqdm=False)[0].outputs[0].token_ids == in_order != swapped
    both = llm.chat([asking(red), asking(blue)], greedy, use_tqdm=False)  # a list of conversations
    assert [o.outputs[0].text for o in both] == [o.outputs[0].text for o in got]


def test_llm_chat_refuses_images_outside_user_messages_and_past_its_limits(vl):
    llm = vl.offline
    system = {"role": "system", "content": [{"type": "text", "text": "Look."}, image_url_part(png_bytes(picture()))]}
    with pytest.raises(ImagePartError, match="user messages only") as e:
        llm.chat([system, *asking(picture())], use_tqdm=False)
    assert e.value.limit == "image_role" and e.value.param == "messages.0.content.1"
    tool = {"role": "tool", "tool_call_id": "c", "content": [image_url_part(png_bytes(picture()))]}
    with pytest.raises(ImagePartError, match="a tool message holds an image"):
        llm.chat([*asking(picture()), tool], use_tqdm=False)
    five = [{"role": "user", "content": [image_url_part(png_bytes(picture()))] * 5}]
    with pytest.raises(ImagePartError, match="5 images .*max_images"):
        llm.chat(five, use_tqdm=False)  # the server's default: 4 images
    big = asking(picture(size=(60, 60)))
    with pytest.raises(ImagePartError, match="max_pixels"):
        llm.chat(big, use_tqdm=False, image_limits=ImageLimits(max_pixels=48 * 48))


def test_llm_chat_on_a_text_only_model_says_so(ckpt):  # noqa: F811
    from nanoseek.engine import LLM
    llm = LLM(ckpt, kv_cache_memory=2**22, speculative=False)
    with pytest.raises(TextOnlyModelError, match="reads text only .*CausalLM.*vision-language"):
        llm.chat(asking(picture()), use_tqdm=False)
    assert llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)[0].outputs  # text still works


# ------------------------------------------------------------------ reading --image
def test_read_images_from_files_and_data_urls(files, tmp_path):
    url = image_url_part(png_bytes(picture(colour=(0, 200, 0))))["image_url"]["url"]
    images = read_images([str(files / "red.png"), str(files / "blue.jpg"), url])
    assert [im.name for im in images] == ["red.png", "blue.jpg", "image2"]
    assert [im.mime for im in images] == ["image/png", "image/jpeg", "image/png"]
    assert images[0].sha256 == decode_image((files / "red.png").read_bytes()).sha256
    assert images[0].data == (files / "red.png").read_bytes()  # sent as read
    ref = images[0].ref()
    assert ref == {"index": 0, "name": "red.png", "sha256": images[0].sha256, "width": 16, "height": 12,
                   "bytes": len(images[0].data)}
    assert pick_image(images, 1) is images[1] and pick_image(images, "1") is images[1]
    assert pick_image(images, "blue.jpg") is images[1]
    for bad in ("/etc/passwd", 7, "../red.png", True):
        with pytest.raises(ValueError, match="no image .*red.png"):
            pick_image(images, bad)
    assert image_format(images[1].data) == "JPEG"
    again = read_images([str(files / "red.png"), str(files / "red.png")])
    assert [im.name for im in again] == ["red.png", "red.png#1"]


def test_read_images_refusals(files, tmp_path):
    with pytest.raises(ImageInputError, match="never fetched"):
        read_images(["http://127.0.0.1:9/cat.png"])
    with pytest.raises(ImageInputError, match="no such file"):
        read_images([str(tmp_path / "missing.png")])
    with pytest.raises(ImageInputError, match="max_bytes"):
        read_images([str(files / "red.png")], ImageLimits(max_bytes=20))
    with pytest.raises(ImageInputError, match="max_images"):
        read_images(["x"] * 3, ImageLimits(max_images=2))  # counted before any is read
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageInputError, match="not a readable image"):
        read_images([str(tmp_path / "notes.png")])


# ------------------------------------------------------------------ the agent with images
def _no_image_bytes(events_text: str, images) -> None:
    assert "base64" not in events_text and "data:image" not in events_text
    for im in images:
        assert base64.b64encode(im.data).decode()[:40] not in events_text


def test_agent_sends_the_images_and_records_what_each_step_saw(files, tmp_path):
    images = read_images([str(files / "red.png"), str(files / "blue.jpg")])

    def model(body):
        user = body["messages"][1]["content"]
        assert [p["type"] for p in user] == ["text", "image_url", "image_url"]
        assert user[1]["image_url"]["url"].startswith("data:image/png;base64,")
        if body["messages"][-1]["role"] == "tool":
            return {"content": "Two boxes."}
        return {"content": "", "tool_calls": [call("calculator", {"expression": "1 + 1"})]}

    path = tmp_path / "t.jsonl"
    with mock_endpoint(model) as (url, requests):
        traj = Agent(url, "m", trajectory_path=path, echo=None).run("How many boxes?", images)
    assert traj.answer == "Two boxes." and len(requests) == 2
    events = [json.loads(line) for line in path.read_text().splitlines()]
    task = events[0]
    assert task["content"] == "How many boxes?" and [r["sha256"] for r in task["images"]] == [im.sha256 for im in images]
    seen = [e for e in events if e["type"] == "see"]
    assert [e["step"] for e in seen] == [1, 2] and all(e["via"] == "model" for e in seen)
    assert [r["name"] for r in seen[0]["images"]] == ["red.png", "blue.jpg"]
    _no_image_bytes(path.read_text(), images)


def test_a_text_only_server_refuses_images_and_the_agent_names_the_vision_tool(files, text_server):
    images = read_images([str(files / "red.png")])
    traj = Agent(text_server.url + "/v1", MODEL, echo=None).run("What colour?", images)
    assert traj.answer is None and "reads text only" in traj.stop_reason
    assert "--vision-endpoint" in traj.stop_reason and "look" in traj.stop_reason
    assert not any(e["type"] == "note" and "text protocol" in e["content"] for e in traj.events)  # no fallback
    assert traj.of_type("see") == []  # no step was answered: none saw the image


def test_agent_against_a_served_vision_language_model(files, vl):
    """The tiny DeepSeek-VL engine behind nanoseek's server answers the task with its image:
    the answer is LLM.chat's for the same messages (text protocol: the tools are described
    in the system message, so the server's prompt is the conversation's)."""
    from nanoseek.engine import SamplingParams
    images = read_images([str(files / "red.png")])
    traj = Agent(vl.url + "/v1", MODEL, mode="text", echo=None, max_tokens=GREEDY["max_tokens"],
                 system="Answer.").run("What colour?", images)
    assert traj.stop_reason == "answered", traj.stop_reason
    see = traj.of_type("see")
    assert len(see) == 1 and see[0]["images"] == [images[0].ref()]
    assert [p["type"] for p in traj.messages[1]["content"]] == ["text", "image_url"]
    want = vl.offline.chat(traj.messages[:2], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    assert traj.answer == want


# ------------------------------------------------------------------ the look tool
def test_check_endpoint_is_loopback_unless_allowed():
    assert check_endpoint("http://127.0.0.1:8001/v1/") == "http://127.0.0.1:8001/v1"
    assert check_endpoint("http://localhost:8001/v1") and check_endpoint("http://[::1]:8/v1")
    with pytest.raises(ValueError, match="not a loopback address.*--vision-remote"):
        check_endpoint("http://10.0.0.7:8001/v1")
    with pytest.raises(ValueError, match="not a loopback"):
        check_endpoint("https://api.example.com/v1")
    assert check_endpoint("https://api.example.com/v1", allow_remote=True)
    with pytest.raises(ValueError, match="http"):
        check_endpoint("file:///etc/passwd", allow_remote=True)


def test_look_reads_an_image_through_a_served_vision_model(files, vl):
    """look(image, question) asks the real server; its text is LLM.chat's greedy answer for
    that question and image (the same engine, the same chat template)."""
    from nanoseek.engine import SamplingParams
    images = read_images([str(files / "red.png"), str(files / "blue.jpg")])
    tool = look_tool(images, vl.url + "/v1", MODEL, max_tokens=GREEDY["max_tokens"])
    for key, im in ((0, images[0]), ("blue.jpg", images[1])):
        got = tool.fn(image=key, question="What is in the picture?")
        conv = [{"role": "user", "content": [{"type": "text", "text": "What is in the picture?"}, im.part()]}]
        want = vl.offline.chat(conv, SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
        assert got == f"image {im.index} ({im.name}): {want}"
    assert look_tool(images, vl.url + "/v1").fn(image=0)  # the model found from /v1/models


def test_look_refusals(files):
    from nanoseek.agent.tools.base import ToolBox
    images = read_images([str(files / "red.png")])
    box = ToolBox([look_tool(images, "http://127.0.0.1:9/v1", "m", timeout_s=2, max_image_bytes=10)])
    assert "no image '/etc/passwd'" in box.call(LOOK, {"image": "/etc/passwd"}).text
    assert "at most 10" in box.call(LOOK, {"image": 0}).text
    roomy = ToolBox([look_tool(images, "http://127.0.0.1:9/v1", "m", timeout_s=2)])
    obs = roomy.call(LOOK, {"image": 0, "question": "?"})
    assert not obs.ok and "vision endpoint failed" in obs.text  # nothing listens on port 9
    assert "characters; the limit" in roomy.call(LOOK, {"image": 0, "question": "x" * 3000}).text
    with pytest.raises(ValueError, match="needs images"):
        look_tool([], "http://127.0.0.1:9/v1")


def test_model_written_arguments_that_python_cannot_read_are_observations(files):
    from nanoseek.agent.guards import Guards
    from nanoseek.agent.tools.base import ToolBox
    box = ToolBox([look_tool(read_images([str(files / "red.png")]), "http://127.0.0.1:9/v1", "m", timeout_s=1)])
    for args in ('{"image": ' + "1" * 5000 + "}", '{"image": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        assert Guards().repeated(LOOK, args) is None
        obs = box.call(LOOK, args)
        assert not obs.ok and "cannot be read" in obs.text
    assert "no image" in box.call(LOOK, {"image": "\u00b3"}).text  # a digit Python's int() refuses
    with pytest.raises(ValueError, match="positive and finite"):
        look_tool(read_images([str(files / "red.png")]), "http://127.0.0.1:9/v1", timeout_s=float("inf"))


def test_image_names_are_unique_and_picked_before_indices(tmp_path):
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
    picture().save(tmp_path / "a" / "x.png#2", format="PNG")
    picture().save(tmp_path / "b" / "x.png", format="PNG")
    picture().save(tmp_path / "c" / "x.png", format="PNG")
    picture().save(tmp_path / "a" / "7", format="PNG")
    (tmp_path / "a" / "latest.png").symlink_to(tmp_path / "b" / "x.png")
    images = read_images([str(tmp_path / p) for p in ("a/x.png#2", "b/x.png", "c/x.png", "a/7", "a/latest.png")])
    names = [im.name for im in images]
    assert len(set(names)) == 5 and names[:2] == ["x.png#2", "x.png"] and names[4] == "latest.png"
    assert [pick_image(images, n).index for n in names] == [0, 1, 2, 3, 4]
    assert pick_image(images, "7").index == 3 and pick_image(images, "4").index == 4


def test_see_events_name_the_vision_tools_own_image_and_memory_keeps_the_users_task(files):
    """The look tool picks from its own images: the trajectory records that one, even when the
    run's images differ; a tool of that name without images (an MCP server's) records nothing.
    Memory keeps the task as the user wrote it, not the image list the agent added."""
    from nanoseek.agent.tools.base import Tool

    class Memory(list):  # what the loop asks of a memory
        def add(self, text, **meta):
            self.append(text)

        def recall(self, query):
            return list(self)

    red, blue = read_images([str(files / "red.png")]), read_images([str(files / "blue.jpg")])
    fake_look = look_tool(red, "http://127.0.0.1:9/v1", "m", timeout_s=1)
    fake_look.fn = lambda image, question="": "seen"

    def model(body):
        if body["messages"][-1]["role"] == "tool":
            return {"content": "done"}
        return {"content": "", "tool_calls": [call(LOOK, {"image": 0})]}

    memory = Memory()
    with mock_endpoint(model) as (url, _):
        traj = Agent(url, "m", [fake_look], echo=None, memory=memory).run("which colour?", blue,
                                                                          images_to_model=False)
        assert traj.of_type("see")[0]["images"] == [red[0].ref()]
        other = Tool(LOOK, "an MCP server's look", {"type": "object", "properties": {}}, lambda **_: "ok")
        traj = Agent(url, "m", [other], echo=None).run("which colour?", blue, images_to_model=False)
        assert traj.answer == "done" and traj.of_type("see") == []
    assert len(memory) == 1 and memory[0].startswith("Task: which colour?\n") and "Images given" not in memory[0]


def test_the_text_only_hint_follows_a_text_only_refusal_not_a_limit():
    from nanoseek.agent.loop import _images_hint
    sent = [{"role": "user", "content": [image_url_part(png_bytes(picture()))]}]

    class Refusal(Exception):
        status_code = 400

        def __init__(self, code, message):
            super().__init__(message)
            self.code = code
    limit = Refusal("max_images", "5 images in one request; the limit is 4 (max_images)")
    blind = Refusal("images_not_supported", "model 'm' reads text only")
    assert _images_hint(limit, sent) == "" and "--vision-endpoint" in _images_hint(blind, sent)


def test_a_text_only_model_looks_through_the_vision_tool(files, vl, tmp_path):
    """The text model gets the image list in its task, not the image; it calls look; the
    trajectory records that step's image (via look) by content hash."""
    images = read_images([str(files / "red.png"), str(files / "blue.jpg")])

    def text_model(body):
        user = body["messages"][1]["content"]
        assert isinstance(user, str) and "1: blue.jpg (16x12 JPEG)" in user  # no image parts
        if body["messages"][-1]["role"] == "tool":
            return {"content": "Seen: " + body["messages"][-1]["content"]}
        return {"content": "", "tool_calls": [call(LOOK, {"image": "blue.jpg", "question": "Colour?"})]}

    path = tmp_path / "t.jsonl"
    with mock_endpoint(text_model) as (url, _):
        tools = [look_tool(images, vl.url + "/v1", MODEL, max_tokens=4)]
        traj = Agent(url, "text", tools, trajectory_path=path, echo=None).run(
            "What colour is the second box?", images, images_to_model=False)
    assert traj.answer.startswith("Seen: image 1 (blue.jpg): ")
    seen = traj.of_type("see")
    assert len(seen) == 1 and seen[0]["via"] == LOOK and seen[0]["step"] == 1
    assert seen[0]["images"] == [images[1].ref()]
    _no_image_bytes(path.read_text(), images)


# ------------------------------------------------------------------ the CLI
def test_cli_agent_image_against_a_vision_server_and_a_text_server(files, vl, text_server, tmp_path):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    path = tmp_path / "t.jsonl"
    base = ["agent", "--model", MODEL, "--mode", "text", "--max-steps", "1", "--max-tokens", "4"]
    res = CliRunner().invoke(app, [*base, "--base-url", vl.url + "/v1", "--image", str(files / "red.png"),
                                   "--trajectory", str(path), "What colour?"])
    sha = read_images([str(files / "red.png")])[0].sha256
    assert f"see: 0 red.png 16x12 sha256:{sha[:12]} (via model)" in res.output, res.output
    assert sha in path.read_text() and "base64" not in path.read_text()
    res = CliRunner().invoke(app, [*base, "--base-url", text_server.url + "/v1", "--image", str(files / "red.png"),
                                   "What colour?"])
    assert res.exit_code == 1 and "--vision-endpoint" in res.output
    res = CliRunner().invoke(app, [*base, "--base-url", text_server.url + "/v1", "--image", str(files / "red.png"),
                                   "--vision-endpoint", "http://192.0.2.1/v1", "What colour?"])
    assert res.exit_code == 2 and "not a loopback address" in res.output
    res = CliRunner().invoke(app, [*base, "--base-url", text_server.url + "/v1", "--image", str(files / "red.png"),
                                   "--max-image-bytes", "20", "What colour?"])
    assert res.exit_code == 2 and "max_bytes" in res.output


def test_cli_image_defaults_are_the_modules():
    import inspect

    from nanoseek.cli.agent import agent_cmd
    opts = inspect.signature(agent_cmd).parameters
    assert opts["max_image_bytes"].default.default == ImageLimits().max_bytes
    assert opts["max_image_pixels"].default.default == ImageLimits().max_pixels
    assert f"longest side of {ImageLimits().max_side} pixels" in opts["image"].default.help


# ------------------------------------------------------------------ a real `nanoseek serve`
@pytest.fixture(scope="module")
def served_dir(ckpt, tmp_path_factory):  # noqa: F811
    """`nanoseek serve` of a tiny DeepSeek-VL (MLA) checkpoint directory, in its own process
    on 127.0.0.1 (the text checkpoint's tokenizer beside it)."""
    import shutil
    import subprocess
    import sys

    import httpx2 as httpx

    from tests.agent_mock import free_port
    from tests.test_engine_vl import MLA_MOE, vl_model
    from tests.test_server import wait_for
    d = tmp_path_factory.mktemp("vl")
    model = vl_model({**MLA_MOE, "vocab_size": 320, "max_position_embeddings": 2048})
    model.config.image_token_id = IMG
    model.save_pretrained(d)
    for f in ckpt.glob("tokenizer*"):
        shutil.copy(f, d / f.name)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(d), "--port", str(port),
                             "--served-model-name", "tiny-vl"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_for(up, "nanoseek serve to start", tries=12000)
        yield d, f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_nanoseek_serve_of_a_vl_checkpoint_answers_the_agent_and_the_look_tool(files, served_dir, tmp_path):
    """The agent's task with its image, and a text model's look call, both answered by a
    real `nanoseek serve` process: each answer is LLM.chat's on the same checkpoint."""
    from typer.testing import CliRunner

    from nanoseek.cli import app
    from nanoseek.engine import LLM, SamplingParams
    d, url = served_dir
    llm, greedy = LLM(str(d), kv_cache_memory=2**22, speculative=False), SamplingParams(**GREEDY)
    images = read_images([str(files / "red.png")])
    traj = Agent(url, "tiny-vl", mode="text", echo=None, max_tokens=GREEDY["max_tokens"],
                 system="Answer.").run("What colour?", images)
    assert traj.stop_reason == "answered" and traj.of_type("see")[0]["images"] == [images[0].ref()]
    assert traj.answer == llm.chat(traj.messages[:2], greedy, use_tqdm=False)[0].outputs[0].text

    def text_model(body):
        if body["messages"][-1]["role"] == "tool":
            return {"content": "Done."}
        return {"content": "", "tool_calls": [call(LOOK, {"image": "red.png", "question": "Colour?"})]}
    with mock_endpoint(text_model) as (text_url, _):
        res = CliRunner().invoke(app, ["agent", "--base-url", text_url, "--model", "text", "--image",
                                       str(files / "red.png"), "--vision-endpoint", url,
                                       "--vision-max-tokens", "6", "What colour is the box?"])
    assert res.exit_code == 0, res.output
    conv = [{"role": "user", "content": [{"type": "text", "text": "Colour?"}, images[0].part()]}]
    seen = llm.chat(conv, greedy, use_tqdm=False)[0].outputs[0].text
    assert f"observation: image 0 (red.png): {seen}" in res.output
    assert f"see: 0 red.png 16x12 sha256:{images[0].sha256[:12]} (via look)" in res.output
