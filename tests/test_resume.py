"""Checkpoints you cannot lose: a resumed run continues exactly, even after kill -9."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoseek.train.loop import TrainConfig, read_metrics
from nanoseek.train.pretrain import pretrain
from tests.train_utils import micro_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = dict(batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4, eval_tokens=256,
             save_every=3, seed=5)


def _losses(run_dir):
    return {r["step"]: (r["loss"], r["lm_loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"}


def _train_steps(run_dir):
    """Every training record's step, in file order: duplicates stay visible."""
    return [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def _evals(run_dir):
    return {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_docs=40)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted run."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    pretrain(out, micro_config(), TrainConfig(max_steps=12, **TRAIN), data_paths=[corpus],
             progress=False, log=lambda *_: None, sample_tokens=4, threads=1)
    return out


def test_resumed_curve_equals_uninterrupted(tmp_path, corpus, reference):
    from nanoseek.model import CausalLM
    from nanoseek.train.loop import Trainer
    from nanoseek.train import pretrain as P

    out = tmp_path / "run"
    # first leg: stop at step 7 (a checkpoint from the pause; the schedule still plans 12)
    orig_fit = Trainer.fit
    try:
        Trainer.fit = lambda self, until=None: orig_fit(self, until=7)
        pretrain(out, micro_config(), TrainConfig(max_steps=12, **TRAIN), data_paths=[corpus],
                 progress=False, log=lambda *_: None, sample_tokens=4, threads=1)
    finally:
        Trainer.fit = orig_fit
    assert max(_losses(out)) == 7
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 7 and "optimizer" in state and "rng" in state
    pretrain(out, micro_config(), TrainConfig(max_steps=12, **TRAIN), data_paths=[corpus],
             resume=True, progress=False, log=lambda *_: None, sample_tokens=4, threads=1)
    ref, got = _losses(reference), _losses(out)
    assert _train_steps(out) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step
    assert _evals(out) == pytest.approx(_evals(reference), rel=1e-6)
    # the run directory is a transformers checkpoint with the tokenizer beside it
    a = CausalLM.from_pretrained(out)
    b = CausalLM.from_pretrained(reference)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_keeps_the_runs_val_fraction(tmp_path, corpus):
    out = tmp_path / "run"
    small = dict(TRAIN, eval_every=0, save_every=0)
    pretrain(out, micro_config(), TrainConfig(max_steps=2, **small), data_paths=[corpus],
             val_fraction=0.1, progress=False, log=lambda *_: None, sample_tokens=0, threads=1)
    meta = json.loads((out / "data" / "meta.json").read_text())
    run = pretrain(out, micro_config(), TrainConfig(max_steps=3, **small), resume=True,
                   val_fraction=0.5, progress=False, log=lambda *_: None, sample_tokens=0, threads=1)
    assert run["data"]["val_fraction"] == 0.1
    assert json.loads((out / "data" / "meta.json").read_text()) == meta  # not re-split
    assert _train_steps(out) == [1, 2, 3]


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, corpus):
    out = tmp_path / "run"
    small = dict(TRAIN, eval_every=0, save_every=0)
    pretrain(out, micro_config(), TrainConfig(max_steps=2, **small), data_paths=[corpus],
             progress=False, log=lambda *_: None, sample_tokens=0, threads=1)
    (out / "train_state.pt").unlink()  # as if killed after step 2, before any checkpoint
    pretrain(out, micro_config(), TrainConfig(max_steps=4, **small), data_paths=[corpus],
             resume=True, progress=False, log=lambda *_: None, sample_tokens=0, threads=1)
    assert _train_steps(out) == [1, 2, 3, 4]


def test_refuses_to_overwrite_a_run(reference, corpus):
    from nanoseek.train.pretrain import RunError
    with pytest.raises(RunError, match="--resume"):
        pretrain(reference, micro_config(), TrainConfig(max_steps=12, **TRAIN), data_paths=[corpus],
                 progress=False, log=lambda *_: None, sample_tokens=4, threads=1)


def _cli(out, corpus, cfg_file, resume=False):
    head = [sys.executable, "-c", "from nanoseek.cli import app; app()", "pretrain",
            "--out", str(out), "--no-progress", "--threads", "1"]
    if resume:  # everything else comes from the run directory
        return head + ["--resume"]
    return head + ["--config", str(cfg_file), "--data", str(corpus), "--max-steps", "12",
                   "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2", "--warmup-steps", "2",
                   "--eval-every", "4", "--eval-tokens", "256", "--save-every", "1", "--seed", "5",
                   "--sample-tokens", "4"]


def test_kill_9_at_random_moments_then_resume(tmp_path, corpus, reference):
    """SIGKILL a real training process several times at random moments (saving every step,
    so some kills land inside a checkpoint write); each --resume continues from the last
    good checkpoint, and the finished run's curve equals the uninterrupted one."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "config.json"
    micro_config().to_json(cfg_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    rng = random.Random(int(os.environ.get("NANOSEEK_KILL_SEED", time.time_ns() % 1000)))
    kills = 0
    for attempt in range(6):
        cmd = _cli(out, corpus, cfg_file, resume=attempt > 0)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # wait until it is training (a metrics line exists beyond the last checkpoint), then kill
        deadline = time.time() + 120
        before = max(_losses(out), default=0)
        while time.time() < deadline and proc.poll() is None:
            if max(_losses(out), default=0) > before:
                break
            time.sleep(0.05)
        if proc.poll() is None and kills < 2:
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            state = torch.load(out / "train_state.pt", weights_only=False) if (out / "train_state.pt").exists() else None
            assert state is None or 1 <= state["step"] <= 12  # always a complete file
            continue
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, log
        break
    assert kills >= 1
    got, ref = _losses(out), _losses(reference)
    assert _train_steps(out) == list(range(1, 13))  # no step lost, none duplicated
    for step in range(1, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 12


def test_interrupted_writes_leave_the_last_good_state(tmp_path):
    from nanoseek.train.checkpointing import load_state, save_state
    save_state(tmp_path, {"step": 3})
    (tmp_path / ".train_state.pt.k9x.tmp").write_bytes(b"\x80half a pickle")  # killed mid-write
    (tmp_path / ".model.safetensors.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".tokenizer.q1").mkdir()
    assert load_state(tmp_path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]
    (tmp_path / "fresh").mkdir()
    assert load_state(tmp_path / "fresh") is None
