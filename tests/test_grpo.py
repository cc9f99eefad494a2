"""GRPO and PPO end to end on a micro model: a toy task whose reward is dense (the share of
the completion's characters that are vowels) so a few steps move it; the reward rises
under GRPO, the engine's sampled log-probs agree with the trainer's, the first pass has
ratio 1, a resumed run equals an uninterrupted one, PPO runs beside it, and the CLI."""

import json

import pytest
import torch

import nanoseek
from nanoseek.data.tasks import TASKS, Example, Task
from nanoseek.model import CausalLM
from nanoseek.text.tokenizer import save_tokenizer, train_tokenizer
from nanoseek.train.run.metrics import read_metrics
from nanoseek.data.tasks.rewards import Reward
from nanoseek.train.rl.config import RLConfig, rl_train_config
from nanoseek.train.rl.run import rl
from tests.train_utils import micro_config, small_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


class Vowels(Task):
    """Reward = the share of vowels among the completion's letters (dense, easy to raise)."""
    name, max_tokens = "vowels", 8

    def __init__(self, **options):
        pass

    def draw(self, rng):
        i = rng.randrange(10**6)
        return str(i), Example(f"Write something ({i}).", "")

    def reward(self, example, completion, length=None):
        letters = [c for c in completion.lower() if c.isalpha()]
        v = sum(c in "aeiou" for c in letters) / max(len(letters), 1)
        return Reward(v, {"vowels": v}, correct=v > 0.5)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("init")
    nanoseek.save_pretrained(CausalLM(micro_config()).eval(), out)
    save_tokenizer(train_tokenizer(small_corpus(60), vocab_size=384), out)
    return out


@pytest.fixture
def vowels(monkeypatch):
    monkeypatch.setitem(TASKS, "vowels", Vowels)


def config(init_dir, **kw) -> RLConfig:
    train = dict(max_steps=4, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=0,
                 eval_every=0, save_every=2)
    train.update(kw.pop("train", {}))
    base = dict(init=str(init_dir), task="vowels", train=rl_train_config(**train),
                num_generations=4, eval_n=4)
    return RLConfig(**{**base, **kw})


def train_records(out):
    return [r for r in read_metrics(out) if r["kind"] == "train"]


def test_grpo_raises_reward_on_a_toy_task(init_dir, vowels, tmp_path):
    cfg = config(init_dir, train=dict(max_steps=30, batch_size=8, grad_accum=1, lr=1e-2,
                                      save_every=30), num_generations=8, beta=0.0)
    rl(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    rewards = [r["reward"] for r in train_records(tmp_path / "run")]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards


def test_step_logs_and_first_pass_ratio(init_dir, vowels, tmp_path):
    cfg = config(init_dir, num_iterations=2, train=dict(max_steps=2, save_every=2))
    run = rl(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    first, second = train_records(tmp_path / "run")
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_frac"] == 0.0
    assert first["logp_mismatch"] < 1e-4  # the engine samples the policy the trainer trains
    assert "logp_mismatch" not in second and second["rollout_s"] == 0.0  # the same rollout, again
    for key in ("reward", "reward_vowels", "accuracy", "kl", "completion_len", "rollout_s",
                "update_s", "tok_s", "rollout_tok_s", "peak_rss_mb", "groups_kept"):
        assert key in first, key
    assert run["start_eval"]["step"] == 0 and (tmp_path / "run" / "model.safetensors").exists()


def test_bf16_update_matches_the_engine(init_dir, vowels, tmp_path):
    """--precision bf16 on a CPU: the update runs on bf16 weight copies; its log-probs
    match the fp32 engine's to bf16 rounding (measured 5e-4 nats/token)."""
    cfg = config(init_dir, beta=0.0, train=dict(max_steps=2, precision="bf16"))
    run = rl(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    first = train_records(tmp_path / "run")[0]
    assert run["precision"] == "bf16" and first["logp_mismatch"] < 1e-2


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo"])
def test_loss_variants_and_options_run(init_dir, vowels, tmp_path, loss_type):
    cfg = config(init_dir, loss_type=loss_type, scale_rewards="batch", epsilon_high=0.28,
                 beta=0.0, mask_truncated_completions=True, drop_equal_groups=True,
                 train=dict(max_steps=2))
    rl(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    recs = train_records(tmp_path / "run")
    assert len(recs) == 2 and "kl" not in recs[0]  # beta 0: no reference model, no KL


def test_bnpo_with_bias_corrected_kl_runs(init_dir, vowels, tmp_path):
    """TRL's bnpo over two micro-batches, and its importance-weighted KL (beta > 0)."""
    cfg = config(init_dir, loss_type="bnpo", beta=0.02, use_bias_correction_kl=True,
                 train=dict(max_steps=2, grad_accum=2))
    rl(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    recs = train_records(tmp_path / "run")
    assert len(recs) == 2 and all(r["kl"] >= 0 and r["loss"] == r["loss"] for r in recs)


def test_every_micro_batch_exists_when_completions_do_not_divide_evenly(init_dir, vowels, tmp_path):
    """3 prompts x 2 completions in 4 micro-batches: 2, 2, 1, 1 completions (each micro-batch
    is one of the 4 that the loss_type normalisations divide by)."""
    cfg = config(init_dir, num_generations=2, beta=0.02,
                 train=dict(max_steps=1, batch_size=3, grad_accum=4, save_every=1))
    rl(tmp_path / "run", cfg, progress=False, log=lambda *a: None)
    assert len(train_records(tmp_path / "run")) == 1


def test_resume_equals_an_uninterrupted_run(init_dir, vowels, tmp_path):
    rl(tmp_path / "a", config(init_dir), progress=False, log=lambda *a: None)
    rl(tmp_path / "b", config(init_dir, train=dict(max_steps=2)), progress=False, log=lambda *a: None)
    rl(tmp_path / "b", config(init_dir), resume=True, progress=False, log=lambda *a: None)
    a = nanoseek.from_pretrained(tmp_path / "a").state_dict()
    b = nanoseek.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]


def test_ppo_runs_with_a_critic(init_dir, vowels, tmp_path):
    rl(tmp_path / "ppo", config(init_dir, algo="ppo", train=dict(max_steps=3, save_every=1)),
       progress=False, log=lambda *a: None)
    recs = train_records(tmp_path / "ppo")
    assert len(recs) == 3 and all("value_loss" in r and "pg_loss" in r for r in recs)
    assert recs[-1]["value_mean"] != 0.0  # the critic learned something
    run = json.loads((tmp_path / "ppo" / "run.json").read_text())
    assert run["stage"] == "ppo"
    assert run["precision"] == "fp32" and run["precision_reason"].startswith("auto: CPU")  # micro: narrow


def test_bad_options_are_named(init_dir):
    for kw, field in [({"loss_type": "x"}, "loss_type"), ({"scale_rewards": "x"}, "scale_rewards"),
                      ({"num_generations": 1}, "num_generations"),
                      ({"num_iterations": 2}, "save_every")]:
        with pytest.raises(ValueError, match=field):
            config(init_dir, train=dict(save_every=3), **kw).validate()


def test_cli_grpo(init_dir, tmp_path):
    from typer.testing import CliRunner

    from nanoseek.cli import app
    res = CliRunner().invoke(app, ["grpo", "--init", str(init_dir), "--out", str(tmp_path / "r"),
                                   "--option", "digits=1", "--max-steps", "1", "--batch-size", "2",
                                   "--num-generations", "2", "--max-completion-length", "6",
                                   "--eval-n", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "held-out accuracy" in res.output and (tmp_path / "r" / "train_state.pt").exists()


def test_rl_report_compares_runs(init_dir, vowels, tmp_path):
    from nanoseek.reports.rl_report import run_summary, write_rl_report
    runs = {}
    for algo in ("grpo", "ppo"):
        runs[algo.upper()] = tmp_path / algo
        rl(tmp_path / algo, config(init_dir, algo=algo, train=dict(max_steps=2, save_every=2)),
           progress=False, log=lambda *a: None)
    path = write_rl_report(tmp_path / "report", runs, extra={"task": "vowels"})
    text = path.read_text()
    assert "| GRPO | 2 |" in text and "| PPO | 2 |" in text and "task: vowels" in text
    for png in ("reward.png", "train_accuracy.png", "heldout_accuracy.png"):
        assert (tmp_path / "report" / png).stat().st_size > 0
    s = run_summary(tmp_path / "ppo")
    assert s["peak_rss_mb"] > 0 and s["step_s"] > 0 and s["eval_start"] is not None
