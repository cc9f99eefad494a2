"""Checkpoints you cannot lose: a resumed run continues exactly, even after kill -9."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanoseek
from nanoseek.train.loop import TrainConfig, read_metrics
from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain
from tests.train_utils import micro_config, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = dict(batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, eval_every=4, eval_tokens=256,
             save_every=3, seed=5)


def _settings(max_steps, corpus=None, val_fraction=0.1, sample_tokens=4, **train):
    return PretrainConfig(model=micro_config(), train=TrainConfig(max_steps=max_steps, **{**TRAIN, **train}),
                          data=DataConfig(paths=[corpus] if corpus else [], val_fraction=val_fraction),
                          sample_tokens=sample_tokens)


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
    pretrain(out, _settings(12, corpus), progress=False, log=lambda *_: None, threads=1)
    return out


def test_resumed_curve_equals_uninterrupted(tmp_path, corpus, reference):
    from nanoseek.train.loop import Trainer

    out = tmp_path / "run"
    # first leg: stop at step 7 (a checkpoint from the pause; the schedule still plans 12)
    orig_fit = Trainer.fit
    try:
        Trainer.fit = lambda self, until=None: orig_fit(self, until=7)
        pretrain(out, _settings(12, corpus), progress=False, log=lambda *_: None, threads=1)
    finally:
        Trainer.fit = orig_fit
    assert max(_losses(out)) == 7
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 7 and "optimizer" in state and "rng" in state
    pretrain(out, _settings(12, corpus), resume=True, progress=False, log=lambda *_: None, threads=1)
    ref, got = _losses(reference), _losses(out)
    assert _train_steps(out) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step
    assert _evals(out) == pytest.approx(_evals(reference), rel=1e-6)
    # the run directory is a transformers checkpoint with the tokenizer beside it
    a = nanoseek.from_pretrained(out)
    b = nanoseek.from_pretrained(reference)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_keeps_the_runs_val_fraction(tmp_path, corpus):
    out = tmp_path / "run"
    small = dict(eval_every=0, save_every=0, sample_tokens=0)
    pretrain(out, _settings(2, corpus, val_fraction=0.1, **small), progress=False,
             log=lambda *_: None, threads=1)
    meta = json.loads((out / "data" / "meta.json").read_text())
    run = pretrain(out, _settings(3, val_fraction=0.5, **small), resume=True, progress=False,
                   log=lambda *_: None, threads=1)
    assert run["data"]["val_fraction"] == 0.1
    assert json.loads((out / "data" / "meta.json").read_text()) == meta  # not re-split
    assert _train_steps(out) == [1, 2, 3]


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, corpus):
    out = tmp_path / "run"
    small = dict(eval_every=0, save_every=0, sample_tokens=0)
    pretrain(out, _settings(2, corpus, **small), progress=False, log=lambda *_: None, threads=1)
    (out / "train_state.pt").unlink()  # as if killed after step 2, before any checkpoint
    pretrain(out, _settings(4, corpus, **small), resume=True, progress=False, log=lambda *_: None,
             threads=1)
    assert _train_steps(out) == [1, 2, 3, 4]


def test_refuses_to_overwrite_a_run(reference, corpus):
    from nanoseek.train.pretrain import RunError
    with pytest.raises(RunError, match="--resume"):
        pretrain(reference, _settings(12, corpus), progress=False, log=lambda *_: None, threads=1)


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
    from nanoseek.train.run.train_state import load_state, save_state
    save_state(tmp_path, {"step": 3})
    (tmp_path / ".train_state.pt.k9x.tmp").write_bytes(b"\x80half a pickle")  # killed mid-write
    (tmp_path / ".model.safetensors.abc.tmp").write_bytes(b"partial")
    (tmp_path / ".tokenizer.q1").mkdir()
    assert load_state(tmp_path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]
    (tmp_path / "fresh").mkdir()
    assert load_state(tmp_path / "fresh") is None


def test_run_settings_round_trip_through_run_json_on_resume(tmp_path, corpus):
    """run.json holds the PretrainConfig whole (asdict); a resume rebuilds it from there, not
    from what the resuming call passed, except the run length it may extend."""
    from nanoseek.train.config import settings_from_dict, settings_to_dict
    from nanoseek.train.loop import Trainer
    from nanoseek.train.run.run_settings import read_settings
    from nanoseek.train.schedule import SCHEDULES

    first = PretrainConfig(micro_config(router_z_loss_coef=0.001),
                           TrainConfig(max_steps=2, batch_size=2, seq_len=16, grad_accum=2, lr=5e-3,
                                       warmup_steps=1, schedule=SCHEDULES[1], eval_every=0,
                                       save_every=0, seed=9),
                           DataConfig(paths=[corpus], val_fraction=0.2), sample_tokens=0)
    assert settings_from_dict(PretrainConfig, settings_to_dict(first)) == first
    out = tmp_path / "run"
    pretrain(out, first, progress=False, log=lambda *_: None, threads=1)
    assert json.loads((out / "run.json").read_text())["settings"] == settings_to_dict(first)
    assert read_settings(out) == first

    used = {}
    orig_fit = Trainer.fit

    def spy(self, until=None):
        used["train"] = self.cfg
        return orig_fit(self, until)
    other = PretrainConfig(micro_config(), TrainConfig(max_steps=3))  # everything else differs
    try:
        Trainer.fit = spy
        run = pretrain(out, other, resume=True, progress=False, log=lambda *_: None, threads=1)
    finally:
        Trainer.fit = orig_fit
    want = PretrainConfig(first.model, dataclasses.replace(first.train, max_steps=3, time_limit=0.0),
                          first.data, first.sample_tokens)
    assert used["train"] == want.train and read_settings(out) == want
    assert run["settings"]["model"]["router_z_loss_coef"] == 0.001 and _train_steps(out) == [1, 2, 3]


def test_runs_saved_before_settings_existed_still_resume(tmp_path, corpus):
    """A run.json of the earlier layout (model_config, train_config, data_paths) is read."""
    from nanoseek.train.config import settings_to_dict
    from nanoseek.train.run.run_settings import DEFAULT_SOURCE, read_settings

    cfg = _settings(5, corpus, val_fraction=0.2)
    d = settings_to_dict(cfg)
    old = {"model_config": d["model"], "train_config": d["train"], "data_paths": [str(corpus)],
           "text_field": "text", "data": {"val_fraction": 0.2}}
    (tmp_path / "run.json").write_text(json.dumps(old))
    got = read_settings(tmp_path)
    assert got.model == cfg.model and got.train == cfg.train
    assert got.data.paths == [str(corpus)] and got.data.val_fraction == 0.2
    old["data_paths"] = [DEFAULT_SOURCE]
    (tmp_path / "run.json").write_text(json.dumps(old))
    assert read_settings(tmp_path).data.paths == []
