"""Nothing a user saved is lost: run directories that are not ours are refused (and left
byte for byte as they were), --overwrite deletes only a run's own files, a stale tokenizer
never wins, one process per run directory, Ctrl-C / SIGTERM save and resume exactly, and
every numeric option has a range."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek.train.loop import TrainConfig, read_metrics
from nanoseek.train.pretrain import DataConfig, PretrainConfig, RunError, pretrain
from tests.test_cli import assert_user_error, invoke
from tests.train_utils import micro_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda *_: None, threads=1)


def snapshot(d: Path) -> dict:
    """Every file under `d` (the lock file aside) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".nanoseek.lock"}


def _settings(corpus, max_steps=1, **train):
    t = dict(batch_size=2, seq_len=32, eval_every=0, eval_tokens=256, save_every=0, seed=3)
    return PretrainConfig(micro_config(), TrainConfig(max_steps=max_steps, **{**t, **train}),
                          DataConfig(paths=[corpus]), sample_tokens=0)


def _train_steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_docs=40)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A directory nanoseek did not write: an HF checkpoint with the user's notes."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (d / "notes.md").write_text("my notes\n")
    return d


# ------------------------------------------------- 1. foreign directories
def test_pretrain_refuses_a_directory_that_is_not_a_run(hf_checkpoint, corpus):
    before = snapshot(hf_checkpoint)
    r = invoke("pretrain", "--out", hf_checkpoint, "--data", corpus, "--max-steps", 1)
    assert_user_error(r, "not a nanoseek run", "config.json", "model.safetensors", "notes.md", "--overwrite")
    r = invoke("pretrain", "--out", hf_checkpoint, "--data", corpus, "--max-steps", 1, "--overwrite")
    assert_user_error(r, "config.json", "model.safetensors", "never replaces files it did not write")
    r = invoke("pretrain", "--out", hf_checkpoint, "--resume")
    assert_user_error(r, "no nanoseek run to resume")
    assert snapshot(hf_checkpoint) == before
    assert not (hf_checkpoint / ".nanoseek.lock").exists()  # a refusal writes nothing at all


def test_overwrite_adds_a_run_beside_foreign_files_that_do_not_clash(tmp_path, corpus):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "todo.txt").write_text("train a model\n")
    (d / "data").mkdir()
    (d / "data" / "mine.txt").write_text("my own data file\n")
    before = snapshot(d)
    with pytest.raises(RunError, match="todo.txt"):
        pretrain(d, _settings(corpus), **QUIET)
    assert snapshot(d) == before
    pretrain(d, _settings(corpus), overwrite=True, **QUIET)
    after = snapshot(d)
    assert all(after[k] == v for k, v in before.items()) and "model.safetensors" in after


def test_overwrite_deletes_only_the_runs_own_files(tmp_path, corpus):
    out = tmp_path / "run"
    pretrain(out, _settings(corpus, max_steps=2), **QUIET)
    (out / "notes.md").write_text("what I tried\n")
    (out / "data" / "extra.txt").write_text("kept\n")
    before = snapshot(out)
    with pytest.raises(RunError, match="--resume.*--overwrite"):
        pretrain(out, _settings(corpus, max_steps=2), **QUIET)
    assert snapshot(out) == before
    pretrain(out, _settings(corpus, max_steps=1), overwrite=True, **QUIET)
    assert (out / "notes.md").read_text() == "what I tried\n"
    assert (out / "data" / "extra.txt").read_text() == "kept\n"
    assert _train_steps(out) == [1]  # a new run, not the old one continued


# ---------------------------------------------------------- 2. speedrun
def test_speedrun_never_deletes_what_is_not_its_own(tmp_path, corpus):
    from nanoseek.recipes.speedrun import speedrun
    other = tmp_path / "mine"  # a pretrain run with the user's files in it
    pretrain(other, _settings(corpus), **QUIET)
    (other / "notes.md").write_text("keep me\n")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    for name, words in (("mine", "pretrain run, not a speedrun"), ("photos", "not a nanoseek run")):
        before = snapshot(tmp_path / name)
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(RunError, match=words):
                speedrun(name, tmp_path, max_steps=1, progress=False, log=lambda *_: None, **flags)
        assert_user_error(invoke("speedrun", "--root", tmp_path, "--name", name, "--overwrite"), words)
        assert snapshot(tmp_path / name) == before


def test_a_speedrun_is_replaced_or_resumed_only_when_asked(tmp_path):
    from nanoseek.recipes.speedrun import check_speedrun_dir
    from nanoseek.train.run.run_dir import remove_own_files
    out = tmp_path / "speedrun"
    (out / "data").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"nanoseek": "speedrun", "settings": {}}))
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 40, "loss": 5.0}\n')
    for f in ("model.safetensors", "train_state.pt", "tokenizer.json", "data/train.bin", "data/meta.json",
              "report.md", "loss.png", ".model.safetensors.x1.tmp"):
        (out / f).write_bytes(b"x")
    (out / "my_notes.txt").write_text("mine\n")
    before = snapshot(out)
    with pytest.raises(RunError, match=r"speedrun \(stopped at step 40\).*--resume.*--overwrite"):
        check_speedrun_dir(out, resume=False, overwrite=False)
    assert_user_error(invoke("speedrun", "--root", tmp_path), "stopped at step 40", "--resume")
    assert snapshot(out) == before
    check_speedrun_dir(out, resume=True, overwrite=False)
    check_speedrun_dir(out, resume=False, overwrite=True)
    remove_own_files(out)
    assert sorted(p.name for p in out.iterdir()) == ["my_notes.txt"]


# ----------------------------------------------------- 3. stale tokenizer
def test_a_stale_tokenizer_never_wins(tmp_path, corpus):
    """A failed run left a 272-token tokenizer.json: a new run uses --tokenizer (or trains
    its own); a resumed run uses exactly the run's own, whatever --tokenizer says."""
    from nanoseek.data import load_corpus
    from nanoseek.text.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from nanoseek.train.config import settings_to_dict
    docs = load_corpus([corpus])
    given = tmp_path / "given"
    save_tokenizer(train_tokenizer(docs, 300), given)
    out = tmp_path / "run"
    save_tokenizer(train_tokenizer(docs, 272), out)  # the failed run's
    (out / "run.json").write_text(json.dumps({"nanoseek": "pretrain", "settings": settings_to_dict(_settings(corpus))}))
    assert len(load_tokenizer(out)) == 272
    pretrain(out, PretrainConfig(**{**_settings(corpus).__dict__,
                                    "data": DataConfig(paths=[corpus], tokenizer=given)}), **QUIET)
    assert (out / "tokenizer.json").read_bytes() == (given / "tokenizer.json").read_bytes()
    own = (out / "tokenizer.json").read_bytes()
    other = tmp_path / "other"
    save_tokenizer(train_tokenizer(docs, 280), other)
    pretrain(out, PretrainConfig(**{**_settings(corpus, max_steps=2).__dict__,
                                    "data": DataConfig(paths=[corpus], tokenizer=other)}),
             resume=True, **QUIET)
    assert (out / "tokenizer.json").read_bytes() == own and _train_steps(out) == [1, 2]
    fresh = tmp_path / "fresh"
    save_tokenizer(train_tokenizer(docs, 272), fresh)
    (fresh / "run.json").write_text(json.dumps({"nanoseek": "pretrain"}))
    pretrain(fresh, _settings(corpus), **QUIET)  # no --tokenizer: trains its own, of the model's size
    assert len(load_tokenizer(fresh)) > 272


# ----------------------------------------------------------------- 4. lock
def test_one_process_per_run_directory(tmp_path, corpus):
    from nanoseek.train.run.run_lock import run_lock
    out = tmp_path / "run"
    code = ("import sys, time\nfrom nanoseek.train.run.run_lock import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == b"held"
        before = snapshot(out)
        lock = (out / ".nanoseek.lock").read_bytes()
        for flags in ([], ["--resume"], ["--overwrite"]):
            r = invoke("pretrain", "--out", out, "--data", corpus, "--max-steps", 1, *flags)
            assert_user_error(r, "in use by another nanoseek process", f"PID {holder.pid}")
        assert snapshot(out) == before and (out / ".nanoseek.lock").read_bytes() == lock
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the flock: never stale
        holder.wait()
    with run_lock(out):
        assert (out / ".nanoseek.lock").read_text().strip() == str(os.getpid())


# ------------------------------------------- 5, 6. signals, exact resume
SIGNAL_RUN = dict(max_steps=60, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=5, eval_every=0,
                  eval_tokens=256, save_every=100, seed=11)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(out, PretrainConfig(micro_config(), TrainConfig(**SIGNAL_RUN), DataConfig(paths=[corpus]),
                                 sample_tokens=0), **QUIET)
    return out


def _pretrain_cmd(out, *args):
    return [sys.executable, "-m", "nanoseek", "pretrain", "--out", str(out), "--no-progress", *args]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_next_step_and_resume_is_exact(tmp_path, corpus, uninterrupted, signum):
    """A real `nanoseek pretrain` (non-default settings, --threads 1, saving only every 100
    steps) gets SIGINT / SIGTERM mid-run: it saves the step it was on, says how to resume
    and exits 128 + signal. `--resume` without --threads (the run's own thread count is
    restored) and with an --lr it must ignore (and says so) then reproduces the
    uninterrupted run's losses bit for bit."""
    out, cfg = tmp_path / "run", tmp_path / "config.json"
    micro_config().to_json(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = ["--config", str(cfg), "--data", str(corpus), "--threads", "1", "--sample-tokens", "0",
             *[a for k, v in SIGNAL_RUN.items() for a in (f"--{k.replace('_', '-')}", str(v))]]
    proc = subprocess.Popen(_pretrain_cmd(out, *flags), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and max(_train_steps(out), default=0) < 2:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 128 + signum, err
    state = torch.load(out / "train_state.pt", weights_only=False)
    stopped = state["step"]
    assert 2 <= stopped < 60 and max(_train_steps(out)) == stopped  # no step lost
    last = err.strip().splitlines()[-1]
    assert f"interrupted by {signal.Signals(signum).name}: checkpoint saved at step {stopped}" in last
    assert f"nanoseek pretrain --out {out} --resume" in last
    res = subprocess.run(_pretrain_cmd(out, "--resume", "--lr", "0.05"), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ignoring --lr (the run's: 0.001)" in res.stderr
    assert json.loads((out / "run.json").read_text())["threads"] == 1
    ref = {r["step"]: r for r in read_metrics(uninterrupted) if r["kind"] == "train"}
    got = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in got] == list(range(1, 61))
    for r in got:  # bit for bit
        assert (r["loss"], r["lm_loss"], r["grad_norm"]) == (ref[r["step"]]["loss"], ref[r["step"]]["lm_loss"],
                                                             ref[r["step"]]["grad_norm"]), r["step"]


def test_resume_says_when_threads_differ(tmp_path, corpus):
    out, said = tmp_path / "run", []
    pretrain(out, _settings(corpus), kind="speedrun", **QUIET)
    pretrain(out, _settings(corpus, max_steps=2), resume=True, progress=False, log=said.append, threads=2)
    assert any("threads: 2 as given, though the run trained with 1" in s for s in said)
    run = json.loads((out / "run.json").read_text())
    assert run["threads"] == 2 and run["nanoseek"] == "speedrun"  # `pretrain --resume` keeps its kind


# ------------------------------------------------- 8. numeric options
BAD_FLAGS = [
    (["pretrain", "--max-steps", "0"], "--max-steps"),
    (["pretrain", "--max-steps", "-5"], "--max-steps"),
    (["pretrain", "--batch-size", "0"], "--batch-size"),
    (["pretrain", "--grad-accum", "0"], "--grad-accum"),
    (["pretrain", "--seq-len", "-1"], "--seq-len"),
    (["pretrain", "--save-every", "-1"], "--save-every"),
    (["pretrain", "--eval-every", "-1"], "--eval-every"),
    (["pretrain", "--eval-tokens", "-1"], "--eval-tokens"),
    (["pretrain", "--sample-every", "-1"], "--sample-every"),
    (["pretrain", "--sample-tokens", "-1"], "--sample-tokens"),
    (["pretrain", "--warmup-steps", "-1"], "--warmup-steps"),
    (["pretrain", "--lr", "0"], "--lr"),
    (["pretrain", "--lr", "-0.001"], "--lr"),
    (["pretrain", "--lr", "nan"], "--lr"),
    (["pretrain", "--lr", "inf"], "--lr"),
    (["pretrain", "--lr", "2"], "--lr"),
    (["pretrain", "--weight-decay", "-0.1"], "--weight-decay"),
    (["pretrain", "--grad-clip", "nan"], "--grad-clip"),
    (["pretrain", "--router-z-loss", "-1"], "--router-z-loss"),
    (["pretrain", "--time-limit", "-1"], "--time-limit"),
    (["pretrain", "--time-limit", "inf"], "--time-limit"),
    (["pretrain", "--seed", "-1"], "--seed"),
    (["pretrain", "--val-fraction", "0"], "--val-fraction"),
    (["pretrain", "--val-fraction", "1"], "--val-fraction"),
    (["pretrain", "--val-fraction", "nan"], "--val-fraction"),
    (["pretrain", "--threads", "100000"], "--threads"),
    (["speedrun", "--minutes", "0"], "--minutes"),
    (["speedrun", "--minutes", "-1"], "--minutes"),
    (["speedrun", "--minutes", "nan"], "--minutes"),
    (["speedrun", "--max-steps", "0"], "--max-steps"),
    (["speedrun", "--threads", "-1"], "--threads"),
    (["tokenizer", "train", "--vocab-size", "0"], "--vocab-size"),
    (["tokenizer", "train", "--vocab-size", "271"], "--vocab-size"),
    (["tokenizer", "train", "--vocab-size", "10000000"], "--vocab-size"),
]


@pytest.mark.parametrize("args, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_numeric_options_out_of_range_are_one_line_errors(tmp_path, args, flag):
    where = ["--root", tmp_path] if args[0] == "speedrun" else ["--out", tmp_path / "x"]
    assert_user_error(invoke(*args, *where), flag)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("field, value, words", [
    ("max_steps", 0, "integer >= 1"), ("lr", float("nan"), "finite number > 0"),
    ("beta1", 1.0, "[0, 1)"), ("min_lr_ratio", 1.5, "[0, 1]"), ("decay_frac", -0.1, "[0, 1]"),
    ("time_limit", float("inf"), ">= 0"), ("save_every", -1, "integer >= 0"),
    ("grad_accum", 1.5, "integer >= 1"), ("warmup_steps", True, "integer >= 0"),
])
def test_library_train_config_limits(tmp_path, corpus, field, value, words):
    """Python callers meet the same limits, before anything is written."""
    with pytest.raises(ValueError, match=rf"'{field}'.*{words.replace('[', '.').replace(')', '.')}"):
        pretrain(tmp_path / "run", _settings(corpus, **{field: value}), **QUIET)
    assert not (tmp_path / "run").exists()


def test_library_data_and_sample_limits(tmp_path, corpus):
    from nanoseek.recipes.speedrun import speedrun
    bad = [PretrainConfig(micro_config(), TrainConfig(), DataConfig(val_fraction=0.0)),
           PretrainConfig(micro_config(), TrainConfig(), sample_tokens=256)]
    for cfg, word in zip(bad, ("val_fraction", "sample_tokens")):
        with pytest.raises(ValueError, match=word):
            pretrain(tmp_path / "run", cfg, **QUIET)
    with pytest.raises(ValueError, match="sample_tokens.*exceed the model's context"):
        pretrain(tmp_path / "run", PretrainConfig(**{**_settings(corpus).__dict__, "sample_tokens": 250}), **QUIET)
    with pytest.raises(ValueError, match="minutes"):
        speedrun("s", tmp_path, minutes=0, progress=False, log=lambda *_: None)
    assert not (tmp_path / "s").exists()


def test_tokenizer_train_never_replaces_a_tokenizer_unasked(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", n_docs=10)
    out = tmp_path / "tok"
    assert invoke("tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--out", out).exit_code == 0
    before = snapshot(out)
    assert_user_error(invoke("tokenizer", "train", "--data", corpus, "--vocab-size", 280, "--out", out),
                      "tokenizer.json", "--overwrite")
    assert snapshot(out) == before
    assert invoke("tokenizer", "train", "--data", corpus, "--vocab-size", 280, "--out", out,
                  "--overwrite").exit_code == 0
    assert snapshot(out) != before


def test_overwrite_removes_a_multi_process_runs_shards_too(tmp_path):
    """A sharded checkpoint left behind would be what the next --resume loads."""
    from nanoseek.train.run.run_dir import remove_own_files, trained_steps
    (tmp_path / "run.json").write_text('{"nanoseek": "pretrain"}')
    (tmp_path / "checkpoint" / "step").mkdir(parents=True)
    (tmp_path / "checkpoint" / ".metadata").write_text("x")
    (tmp_path / ".checkpoint.staging").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert trained_steps(tmp_path) == 1
    gone = remove_own_files(tmp_path)
    assert {"checkpoint", ".checkpoint.staging", "run.json"} <= set(gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
