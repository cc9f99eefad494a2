"""SFT end to end on a micro model: the assistant-only loss falls, greedy decoding of the
fine-tuned checkpoint reproduces a trained answer, the run resumes, the CLI fails cleanly."""

import json

import pytest
import torch
from typer.testing import CliRunner

from nanoseek import from_pretrained
from nanoseek.cli import app
from nanoseek.data.chat import encode_with_mask
from nanoseek.text.tokenizer import load_tokenizer
from nanoseek.train.loop import read_metrics
from nanoseek.train.posttrain.sft import SFTConfig, sft, sft_train_config
from tests.posttrain_utils import PAIRS, make_init, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return make_init(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl",
                       [{"prompt": p, "response": r} for p, r in PAIRS])


def greedy_answer(run_dir, prompt: str, max_new_tokens: int = 8) -> str:
    model, tok = from_pretrained(run_dir), load_tokenizer(run_dir)
    ids, _ = encode_with_mask([{"role": "user", "content": prompt}], tok, add_generation_prompt=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def config(init, data, **train):
    return SFTConfig(init=str(init), data=[str(data)],
                     train=sft_train_config(**{"max_steps": 60, "batch_size": 2, "seq_len": 64,
                                               "lr": 1e-2, "warmup_steps": 5, **train}))


def test_sft_lowers_the_loss_and_reproduces_a_trained_answer(tmp_path, init, data):
    before = greedy_answer(init, PAIRS[0][0])
    run = sft(tmp_path, config(init, data), progress=False, log=lambda *a: None)
    assert run["loss_after"] < run["loss_before"] / 5
    assert run["data"]["conversations"] == 4 and run["data"]["windows"] == 2  # packed: 2 per window
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(train) == 60 and train[-1]["lm_loss"] < train[0]["lm_loss"]
    for prompt, answer in PAIRS:
        assert greedy_answer(tmp_path, prompt) == answer
    assert before != PAIRS[0][1]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["stage"] == "sft"
    assert run["precision"] == "fp32" and run["precision_reason"].startswith("auto: CPU")  # micro: narrow


def test_sft_resumes_to_the_same_weights(tmp_path, init, data):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    quiet = dict(progress=False, log=lambda *a: None)
    # the schedule must not depend on max_steps, which the resumed run extends
    sft(whole, config(init, data, max_steps=6, save_every=3, schedule="constant"), **quiet)
    sft(parts, config(init, data, max_steps=3, save_every=3, schedule="constant"), **quiet)
    with pytest.raises(RuntimeError, match="pass --resume"):
        sft(parts, config(init, data, max_steps=3), **quiet)
    sft(parts, config(init, data, max_steps=3), resume=True, max_steps=6, **quiet)
    a, b = from_pretrained(whole).state_dict(), from_pretrained(parts).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(parts) if r["kind"] == "train"] == list(range(1, 7))


def test_sft_never_writes_over_a_saved_model(tmp_path, init, data):
    """Not the --model directory, nor a directory of files no nanoseek run wrote, resumed or not."""
    quiet = dict(progress=False, log=lambda *a: None)
    before = {p.name: p.read_bytes() for p in init.iterdir() if p.is_file()}
    with pytest.raises(RuntimeError, match="is the --model directory"):
        sft(init, config(init, data, max_steps=1), **quiet)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"my weights")
    for resume in (False, True):
        with pytest.raises(RuntimeError, match="is not empty and holds no nanoseek run"):
            sft(mine, config(init, data, max_steps=1), resume=resume, **quiet)
    assert (mine / "model.safetensors").read_bytes() == b"my weights"
    assert {p.name: p.read_bytes() for p in init.iterdir() if p.is_file()} == before


def test_sft_cli(tmp_path, init, data):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["sft", "--init", str(init), "--data", str(data), "--out", str(out),
                            "--max-steps", "2", "--seq-len", "64", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "loss on assistant tokens" in r.output and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    r = runner.invoke(app, ["sft", "--init", str(init), "--data", str(bad), "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "bad.jsonl:1: expected 'messages'" in r.output
    r = runner.invoke(app, ["sft", "--init", str(init), "--out", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "exactly one of --data FILE or --task NAME" in r.output


def test_task_options_reach_the_task():
    """`sft --task arithmetic --option digits=1`: the demonstrations are 1-digit problems."""
    import re

    from nanoseek.train.posttrain.sft import SFTConfig, conversations_of
    convs = conversations_of(SFTConfig(init="unused", task="arithmetic", task_examples=20,
                                       task_options={"digits": 1, "ops": "+"}))
    numbers = [int(n) for c in convs for n in re.findall(r"\d+", c[-2]["content"].split("\n")[0])]
    assert len(convs) == 20 and numbers and max(numbers) <= 9


def test_eval_n_logs_task_accuracy_and_stop_at_accuracy_needs_what_it_reads(tmp_path, init):
    """--eval-n: each evaluation solves held-out task problems greedily through the engine
    over the live weights; --stop-at-accuracy is refused without what it would stop on."""
    cfg = SFTConfig(init=str(init), task="arithmetic", task_options={"digits": 1, "ops": "+"},
                    task_examples=8, eval_task_n=3,
                    train=sft_train_config(max_steps=2, batch_size=2, seq_len=128, eval_every=1))
    sft(tmp_path, cfg, progress=False, log=lambda *a: None)
    evals = [r for r in read_metrics(tmp_path) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["format"] <= 1 for r in evals)
    for bad, msg in [(dict(stop_at_accuracy=0.5), "needs --task, --eval-n > 0"),
                     (dict(eval_task_n=3, stop_at_accuracy=1.5), "'stop_at_accuracy': must be a finite number > 0 and <= 1")]:
        with pytest.raises(ValueError, match=msg):
            SFTConfig(init="x", task="arithmetic", train=sft_train_config(eval_every=5), **bad).validate()
    with pytest.raises(ValueError, match="--eval-n measures a task"):
        SFTConfig(init="x", data=["d.jsonl"], eval_task_n=3).validate()
