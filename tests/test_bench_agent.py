"""benchmarks/bench_agent.py's settings: a start that is not a checkpoint and a stop rule
that can never fire are refused before any training."""

import pytest

from benchmarks import bench_agent


def test_defaults_are_a_step_budget_a_time_cap_and_a_stop_on_accuracy():
    args = bench_agent.parse_args([])
    assert args.init == "random" and args.max_steps > 0 and args.train_seconds > 0
    assert 0 < args.stop_at <= 1 and args.threads == 1


def test_a_start_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_agent.parse_args(["--init", str(tmp_path)])
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert bench_agent.parse_args(["--init", str(tmp_path)]).init == str(tmp_path)


@pytest.mark.parametrize("stop_at", ["0", "1.5"])
def test_a_stop_rule_out_of_range_is_refused(stop_at, capsys):
    with pytest.raises(SystemExit):
        bench_agent.parse_args(["--stop-at", stop_at])
    assert "--stop-at" in capsys.readouterr().err
