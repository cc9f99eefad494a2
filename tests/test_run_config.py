"""`--config run.toml` on every training command: keys are option names (tables only group
them), flags override the file, unknown keys and bad values are one-line errors naming the
file, and the file's values meet the same limits as flags and Python callers."""

import pytest

from tests.test_cli import Called, _capture, _train_config, assert_user_error, invoke


def _toml(tmp_path, text: str):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def _pretrain_settings(result):
    (args, _), = [result.exception.args]
    return args[1]


def test_pretrain_reads_the_file_and_flags_override_it(monkeypatch, tmp_path):
    _capture(monkeypatch, "nanoseek.train.pretrain", "pretrain")
    cfg = _toml(tmp_path, 'preset = "tiny"\nno-progress = true\n[train]\nmax_steps = 7\nlr = 1e-3\n'
                          'schedule = "wsd"\n[data]\nval_fraction = 0.2\ndata = ["a.txt"]\n')
    r = invoke("pretrain", "--config", cfg, "--out", tmp_path / "run", "--lr", "2e-3")
    assert isinstance(r.exception, Called), r.output
    s = _pretrain_settings(r)
    assert (s.train.max_steps, s.train.lr, s.train.schedule) == (7, 2e-3, "wsd")
    assert s.data.val_fraction == 0.2 and s.data.paths == ["a.txt"]
    assert r.exception.args[1]["progress"] is False
    # the defaults the file leaves alone are the command's own
    assert (s.train.batch_size, s.train.warmup_steps) == (8, 30)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    cfg = _toml(tmp_path, "[train]\nmax_stepz = 3\n")
    assert_user_error(invoke("pretrain", "--config", cfg, "--out", tmp_path / "run"), "max_stepz", str(cfg))
    assert not (tmp_path / "run").exists()


def test_bad_values_and_bad_files_are_one_line_errors(tmp_path):
    cfg = _toml(tmp_path, "max_steps = 0\n")
    assert_user_error(invoke("pretrain", "--config", cfg, "--out", tmp_path / "run"),
                      "--max-steps", "integer >= 1", str(cfg))
    cfg = _toml(tmp_path, 'precision = "bf32"\n')
    assert_user_error(invoke("sft", "--config", cfg, "--model", "x", "--out", "y"), "--precision", "bf32")
    cfg = _toml(tmp_path, "max_steps = \n")
    assert_user_error(invoke("pretrain", "--config", cfg, "--out", "x"), str(cfg), "not valid TOML")
    assert_user_error(invoke("pretrain", "--config", tmp_path / "none.toml", "--out", "x"), "none.toml")
    cfg = _toml(tmp_path, "max_steps = 3\n[train]\nmax_steps = 4\n")
    assert_user_error(invoke("pretrain", "--config", cfg, "--out", "x"), "given twice")


def test_a_json_config_is_the_old_model_config_spelling(monkeypatch, tmp_path):
    from nanoseek.config import preset
    _capture(monkeypatch, "nanoseek.train.pretrain", "pretrain")
    model = tmp_path / "config.json"
    preset("tiny").replace(num_hidden_layers=3).to_json(model)
    r = invoke("pretrain", "--config", model, "--out", tmp_path / "run")
    assert _pretrain_settings(r).model.num_hidden_layers == 3
    assert "use --model-config" in r.stderr
    r = invoke("pretrain", "--model-config", model, "--out", tmp_path / "run")
    assert _pretrain_settings(r).model.num_hidden_layers == 3 and r.stderr == ""


@pytest.mark.parametrize("command, module, name", [
    (["sft", "--task", "arithmetic"], "nanoseek.train.posttrain.sft", "sft"),
    (["dpo"], "nanoseek.train.posttrain.dpo", "dpo"),
    (["grpo"], "nanoseek.train.rl.run", "rl"),
], ids=["sft", "dpo", "grpo"])
def test_post_training_commands_read_a_config(monkeypatch, tmp_path, command, module, name):
    _capture(monkeypatch, module, name)
    cfg = _toml(tmp_path, 'model = "x"\nout = "y"\n[train]\nlr = 1e-4\nseed = 5\nwarmup_steps = 2\n')
    r = invoke(*command, "--config", cfg, "--seed", "6")
    train = _train_config(r)
    assert (train.lr, train.seed, train.warmup_steps) == (1e-4, 6, 2)
    settings = next(a for a in r.exception.args[0] if hasattr(a, "init"))
    assert settings.init == "x"


def test_speedruns_read_a_config(monkeypatch, tmp_path):
    _capture(monkeypatch, "nanoseek.recipes.speedrun", "speedrun")
    r = invoke("speedrun", "--config", _toml(tmp_path, 'minutes = 2\nprecision = "fp32"\nout = "r/s"\n'))
    args, kw = r.exception.args
    assert [str(a) for a in args[:3]] == ["s", "r", "2.0"] and kw["precision"] == "fp32"
    _capture(monkeypatch, "nanoseek.recipes.speedrun_rl", "speedrun_rl")
    r = invoke("speedrun-rl", "--config", _toml(tmp_path, "grpo_steps = 3\nthreshold = 0.5\n"))
    args, kw = r.exception.args
    assert args[5] == 3 and args[7] == 0.5


def test_python_callers_meet_the_same_limits():
    """One rule: the field's limits check a flag, a file's value and TrainConfig(...)."""
    from nanoseek.train.config import TrainConfig
    with pytest.raises(ValueError, match="'lr': must be a finite number > 0 and <= 1, got 2"):
        TrainConfig(lr=2).validate()
    assert_user_error(invoke("pretrain", "--out", "x", "--lr", "2"), "--lr", "> 0 and <= 1")
    from nanoseek.cli.settings import option_help
    assert option_help(TrainConfig, "lr") in invoke("pretrain", "--help", env={"COLUMNS": "400"}).output


@pytest.mark.parametrize("command, flag, toml_value, py_value, settings, what", [
    ("grpo", "--temperature", "0", 0.0, "nanoseek.train.rl.config:RLConfig", "must be a finite number > 0"),
    ("grpo", "--algo", '"x"', "x", "nanoseek.train.rl.config:RLConfig", "must be one of grpo | ppo"),
    ("sft", "--val-fraction", "1", 1.0, "nanoseek.train.posttrain.settings:SFTConfig",
     "must be a finite number in [0, 1)"),
    ("dpo", "--beta", "0", 0.0, "nanoseek.train.posttrain.settings:DPOConfig", "must be a finite number > 0"),
])
def test_stage_settings_meet_one_rule_from_a_flag_a_file_and_python(tmp_path, command, flag, toml_value,
                                                                     py_value, settings, what):
    """The RL, SFT and DPO flags are built from their dataclass fields: the same limit in
    the same words whether the value comes from a flag, a run.toml or Python."""
    import importlib
    import re
    key = flag[2:].replace("-", "_")
    assert_user_error(invoke(command, "--out", "x", "--model", "m", flag, str(py_value)), flag, what)
    cfg = _toml(tmp_path, f"{key} = {toml_value}\n")
    assert_user_error(invoke(command, "--config", cfg, "--out", "x", "--model", "m"), flag, what, str(cfg))
    module, name = settings.split(":")
    cls = getattr(importlib.import_module(module), name)
    data = {} if command == "grpo" else {"data": ["d.jsonl"]}
    with pytest.raises(ValueError, match=re.escape(f"'{key}': {what}")):
        cls(init="m", **data, **{key: py_value}).validate()


def test_lora_flags_come_from_lora_settings():
    """--lora-r keeps its CLI default 8 (LoraSettings.r = 0 means no adapters), and --lora
    with r = 0 is refused rather than silently training the full model."""
    assert_user_error(invoke("sft", "--out", "x", "--model", "m", "--data", "d.jsonl", "--lora", "--lora-r", "0"),
                      "--lora-r must be >= 1")
    from nanoseek.train.posttrain.settings import LoraSettings
    with pytest.raises(ValueError, match="'r': must be an integer >= 0, got -1"):
        LoraSettings(r=-1).validate()
