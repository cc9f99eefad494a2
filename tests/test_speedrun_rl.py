"""The RL speedrun's plumbing on a micro model with budgets of seconds: every stage runs,
the report holds the before/after table measured on the same problems, and the run
directory is replaced only when asked, deleting only its own files. (Whether GRPO gains
is a matter of minutes on a real checkpoint: README "Reinforcement learning".)"""

import json

import pytest

from nanoseek.recipes.speedrun_rl import prepare_dir, speedrun_rl
from nanoseek.train.run.run_dir import RunError
from tests.posttrain_utils import make_init

pytestmark = pytest.mark.usefixtures("one_thread")


def test_speedrun_rl_runs_every_stage_and_reports_before_and_after(tmp_path):
    base = make_init(tmp_path / "base")
    lines = []
    path = speedrun_rl("rl", tmp_path / "runs", base=base, sft_minutes=0.02, grpo_steps=2,
                       eval_n=6, stage_eval_n=4, log=lines.append, fp4_experts_from=1)
    out = tmp_path / "runs" / "rl"
    result = json.loads((out / "result.json").read_text())
    assert result["before"]["n"] == result["after"]["n"] == 6
    assert result["sft"]["steps"] >= 1 and result["grpo"]["steps"] >= 1
    text = path.read_text()
    assert "| accuracy (6 problems) |" in text and "after GRPO" in text
    assert "- torch threads (SFT, GRPO): adaptive" in text
    assert (out / "heldout_accuracy.png").exists() and (out / "grpo" / "model.safetensors").exists()
    assert any("[5/5] report" in line for line in lines)
    for stage in ("sft", "grpo"):  # every stage's own step 1 on
        assert json.loads((out / stage / "run.json").read_text())["settings"]["train"]["fp4_experts_from"] == 1


def test_the_run_directory_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "rl"
    prepare_dir(out, overwrite=False)
    (out / "sft").mkdir()
    (out / "mine.txt").write_text("a user's file")
    with pytest.raises(RunError, match="pass --overwrite"):
        prepare_dir(out, overwrite=False)
    prepare_dir(out, overwrite=True)
    assert not (out / "sft").exists() and (out / "mine.txt").read_text() == "a user's file"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("x")
    with pytest.raises(RunError, match="not an RL speedrun"):
        prepare_dir(other, overwrite=True)
    assert (other / "data.csv").exists()
