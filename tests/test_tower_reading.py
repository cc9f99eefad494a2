"""The vision tower's reading stage (train/posttrain/tower_reading.py) and rendered
arithmetic's picture-to-calculator target: the stage trains the tower alone on the task's
training pictures and leaves only the tower behind; `nanoseek sft --tower-reading-steps`
runs it before SFT and keeps its record across a resume; the "tool" demonstrations read
the picture into the calculator call and earn full reward; bench_vision runs end to end."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nanoseek.cli import app
from nanoseek.data.tasks import load_task
from nanoseek.model.vl import DeepseekVLForConditionalGeneration
from nanoseek.model.vl.vl_build import vl_from_text
from nanoseek.model.vl.vl_image import image_processor
from nanoseek.model import CausalLM
from nanoseek.text.chat_template import chat_parts
from nanoseek.text.images import decode_image
from nanoseek.text.tokenizer import load_tokenizer
from nanoseek.train.posttrain.sft import SFTConfig, sft_train_config
from nanoseek.train.posttrain.tower_reading import (CHARS, ReadingHead, TowerReadingError, batch_of,
                                                     char_targets, stage_batches, teach_tower_to_read)
from tests.posttrain_utils import make_init

pytestmark = pytest.mark.usefixtures("one_thread")
ONE = {"digits": 1, "ops": "+", "image_size": [96, 64], "style": "plain"}


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return make_init(tmp_path_factory.mktemp("init"))


def fresh_tower(init):
    return vl_from_text(CausalLM.from_pretrained(init), load_tokenizer(init), "tiny-vl", 0)[0].vision_model


def test_pictures_are_the_examples_pictures():
    """`pictures` draws what `examples` draws (same seeds), without the PNG round trip."""
    task = load_task("rendered_arithmetic", digits=2, ops="+-*", image_size=[96, 64], target="reading")
    pairs, examples = task.pictures("train", 6, 3), task.examples("train", 6, 3)
    for (image, text), ex in zip(pairs, examples):
        assert text == ex.answer == f"{ex.meta['a']} {ex.meta['op']} {ex.meta['b']}"
        assert np.array_equal(np.asarray(image), np.asarray(decode_image(ex.meta["image"]).image))


def test_char_targets_pad_with_the_end_mark_and_refuse_strangers():
    t = char_targets(["7 + 3", "12 * 4"], 7)
    assert t[0].tolist() == [CHARS.index(c) for c in "7 + 3"] + [len(CHARS)] * 2
    assert t[1, 5].item() == CHARS.index("4") and t[1, 6].item() == len(CHARS)
    with pytest.raises(TowerReadingError, match="does not fit"):
        char_targets(["7 / 3"], 7)
    with pytest.raises(TowerReadingError, match="does not fit"):
        char_targets(["123 + 456"], 7)


def test_the_row_reader_reads_every_row_with_one_map():
    """A row reads the same in any slot (the aligner maps every row alike), and only the
    first `slots` rows are read; the flat reader sees every row."""
    torch.manual_seed(0)
    head = ReadingHead(patches=9, width=8, slots=4)
    hidden = torch.randn(2, 9, 8)
    hidden[:, 3] = hidden[:, 0]
    flat, row = head(hidden)
    assert flat.shape == row.shape == (2, 4, len(CHARS) + 1)
    torch.testing.assert_close(row[:, 3], row[:, 0])
    assert not torch.allclose(row[:, 1], row[:, 0])
    moved = hidden.clone()
    moved[:, 4:] += 1.0  # rows past the slots: the row reader ignores them, the flat one does not
    assert torch.equal(head(moved)[1], row) and not torch.allclose(head(moved)[0], flat)
    with pytest.raises(TowerReadingError, match="rows"):
        ReadingHead(patches=3, width=8, slots=4)


def test_the_stage_teaches_the_tower_and_leaves_no_head(init):
    """A few hundred steps on one-digit sums: the held-out characters read far better than
    the random tower's; the tower's weights moved, its parameter names are its own."""
    tower = fresh_tower(init)
    names, before = set(tower.state_dict()), {k: v.clone() for k, v in tower.state_dict().items()}
    task = load_task("rendered_arithmetic", **ONE, target="reading")
    rec = teach_tower_to_read(tower, task, image_processor(None, 96), steps=80, batch_size=32, log=lambda *a: None)
    assert rec["steps"] == 80
    assert rec["after"]["char_accuracy"] >= rec["before"]["char_accuracy"] + 0.3
    assert set(tower.state_dict()) == names
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_a_worker_draws_the_same_batches_and_trains_the_same_tower(init):
    """Pictures drawn in a DataLoader worker are the in-process ones, batch k from seed
    * 1_000_003 + k; so the tower after a few steps is the same with and without one."""
    task, proc = load_task("rendered_arithmetic", **ONE, target="reading"), image_processor(None, 96)
    drawn = stage_batches(task, proc, 5, 4, 5, workers=1)
    for k in range(3):
        pixels, targets = next(drawn)
        want = batch_of(task, proc, 5 * 1_000_003 + k, 4, 5)
        assert torch.equal(pixels, want[0]) and torch.equal(targets, want[1])
    del drawn
    towers = []
    for workers in (0, 1):
        tower = fresh_tower(init)
        teach_tower_to_read(tower, task, proc, steps=3, batch_size=4, workers=workers, log=lambda *a: None)
        towers.append(tower.state_dict())
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])


def test_the_stage_refuses_what_it_cannot_read(init):
    tower = fresh_tower(init)
    with pytest.raises(TowerReadingError, match="transcribed pictures"):
        teach_tower_to_read(tower, load_task("arithmetic", digits=1), image_processor(None, 96), steps=1)
    with pytest.raises(TowerReadingError, match="needs a length"):
        teach_tower_to_read(tower, load_task("rendered_arithmetic", **ONE), image_processor(None, 96))
    with pytest.raises(ValueError, match="give --task rendered_arithmetic"):
        SFTConfig(init=str(init), data=["rows.jsonl"], vision="tiny-vl", tower_reading_steps=3).validate()
    with pytest.raises(TowerReadingError, match="must be >= 0"):
        teach_tower_to_read(tower, load_task("rendered_arithmetic", **ONE), image_processor(None, 96), steps=1,
                            seed=-1)
    with pytest.raises(TowerReadingError, match="workers=-1 must be >= 0"):
        teach_tower_to_read(tower, load_task("rendered_arithmetic", **ONE), image_processor(None, 96), steps=1,
                            workers=-1)


def test_a_text_only_model_is_refused_before_any_training(tmp_path, init):
    """--tower-reading-* on a text model without --vision: one error naming the fix."""
    from nanoseek.train.posttrain.sft import sft
    from nanoseek.train.posttrain.vision_sft import VisionSFTError
    config = SFTConfig(init=str(init), task="arithmetic", task_examples=4, tower_reading_steps=3,
                       task_options={"digits": 1}, train=sft_train_config(max_steps=1))
    with pytest.raises(VisionSFTError, match="text-only model.*--vision tiny-vl"):
        sft(tmp_path / "run", config, progress=False, log=lambda *a: None)
    assert not (tmp_path / "run" / "train_state.pt").exists()


def test_sft_reads_first_then_keeps_the_tower_frozen_and_the_record_on_resume(tmp_path, init):
    """`nanoseek sft --tower-reading-steps 30`: run.json holds the stage's record, the saved
    tower is the stage's (not the fresh one) and SFT trained none of it; a resumed run skips
    the stage and keeps the record."""
    runner = CliRunner()
    out = tmp_path / "run"
    cmd = ["sft", "--model", str(init), "--out", str(out), "--task", "rendered_arithmetic", "--task-examples", "4",
           "--option", "digits=1", "--option", "ops=+", "--option", "image_size=[96,64]", "--option",
           "target=tool", "--vision", "tiny-vl", "--tower-reading-steps", "30", "--seq-len", "256",
           "--batch-size", "2", "--save-every", "2", "--no-progress"]
    r = runner.invoke(app, cmd + ["--max-steps", "2"])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["tower_reading"]["steps"] == 30 and run["trainable_parameters"]["vision"] == 0
    saved = DeepseekVLForConditionalGeneration.from_pretrained(out).vision_model.state_dict()
    fresh = fresh_tower(init).state_dict()
    fresh_seeded = vl_from_text(CausalLM.from_pretrained(init), load_tokenizer(init), "tiny-vl",
                                run["settings"]["train"]["seed"])[0].vision_model.state_dict()
    assert any(not torch.equal(saved[k], fresh_seeded[k]) for k in saved) and set(saved) == set(fresh)
    r = runner.invoke(app, cmd + ["--max-steps", "4", "--resume"])
    assert r.exit_code == 0, r.output
    assert "tower comes from its checkpoint" in r.output
    again = json.loads((out / "run.json").read_text())
    assert again["tower_reading"] == run["tower_reading"] and again["summary"]["steps"] == 4
    after = DeepseekVLForConditionalGeneration.from_pretrained(out).vision_model.state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in saved)  # frozen through the resumed steps


def test_tool_target_reads_the_picture_into_the_call():
    """The instruction then the picture (as the agent sends them), the call's expression is
    the picture's, the tool's output is not the model's; the demonstration earns full reward."""
    task = load_task("rendered_arithmetic", **ONE, target="tool")
    ex = task.examples("train", 1, 0)[0]
    system, user, call, tool, answer = task.messages(ex)
    assert system["role"] == "system" and "calculator" in system["content"]
    assert [p["type"] for p in user["content"]] == ["text", "image_url"]
    reading = f"{ex.meta['a']} + {ex.meta['b']}"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"expression": reading}
    assert reading in call["content"] and tool["content"] == ex.answer == str(ex.meta["a"] + ex.meta["b"])
    def text(messages, prompt):
        return "".join(p.text for p in chat_parts(messages, prompt, image_token_id=999))
    completion = text(task.messages(ex), False).removeprefix(text(task.prompt_messages(ex), True))
    r = task.reward(ex, completion)
    assert r.correct and r.components["accuracy"] == 1.0 and r.components["format"] == 1.0
    assert not task.reward(ex, completion.replace(f"<answer>{ex.answer}", "<answer>99")).correct


def test_bench_vision_end_to_end(tmp_path, init):
    """bench_vision's pipeline on a micro model for a few steps: the agent runs over the
    server with the picture, the bare prompt is answered, the last line has every field."""
    from benchmarks.bench_vision import main
    result = main(["--init", str(init), "--out", str(tmp_path / "vl"), "--tower-minutes", "0.01",
                   "--minutes", "5", "--max-steps", "2", "--train-examples", "32", "--seq-len", "256", "--test-n", "4",
                   "--threads", "1"])
    for k in ("read_accuracy", "agent_accuracy", "bare_accuracy"):
        assert 0.0 <= result[k] <= 1.0
    assert result["n"] == 4 and result["saw_image"] == 1.0 and result["tower_reading"]["steps"] > 0
