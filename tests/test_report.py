"""The speedrun end to end, shrunk to a few steps: every stage runs, the report holds the
numbers the issue asks for, and the run directory is a checkpoint."""

import json

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")


def test_speedrun_smoke(tmp_path):
    from nanoseek.recipes.speedrun import speedrun
    path = speedrun("smoke", tmp_path, minutes=5, max_steps=3, progress=False, log=lambda *_: None,
                    threads=1, eval_tokens=1024, warmup_steps=1)
    text = path.read_text()
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    assert run["summary"]["steps"] == 3 and run["settings"]["model"]["bias_update_speed"] == 0.01
    for needle in ("unigram baseline loss", "parameters, total", "8,223,744 main model + 1,934,784 MTP module",
                   "3,046,400 main model", "MFU",
                   "reloaded checkpoint", "expert-load max violation", "layer 3", "MTP 0"):
        assert needle in text, needle
    assert (tmp_path / "smoke" / "model.safetensors").exists()
    assert (tmp_path / "smoke" / "tokenizer.json").exists()
    # a second speedrun is refused; --resume continues (here: re-evaluates, re-reports),
    # --overwrite replaces only the speedrun's own files; a foreign directory is never deleted
    from nanoseek.train.run.run_dir import RunError
    (tmp_path / "smoke" / "notes.txt").write_text("mine")
    quiet = dict(progress=False, log=lambda *_: None, threads=1, eval_tokens=1024)
    with pytest.raises(RunError, match="finished at step 3.*--resume.*--overwrite"):
        speedrun("smoke", tmp_path, max_steps=3, **quiet)
    assert speedrun("smoke", tmp_path, resume=True, **quiet) == path
    speedrun("smoke", tmp_path, max_steps=1, overwrite=True, **quiet)
    run = json.loads((tmp_path / "smoke" / "run.json").read_text())
    assert run["summary"]["steps"] == 1 and (tmp_path / "smoke" / "notes.txt").read_text() == "mine"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(RunError, match="not a nanoseek run"):
        speedrun("mine", tmp_path, max_steps=1, progress=False, log=lambda *_: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
