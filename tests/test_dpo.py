"""DPO: the sigmoid loss on a known pair, a reference that never learns, a run that makes
the policy prefer the chosen answers, LoRA's reference (adapters off), pairs sampled on a
task and scored by its reward."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from nanoseek.cli import app
from nanoseek.data.preferences import encode_pairs, read_pairs
from nanoseek.model import CausalLM
from nanoseek.text.tokenizer import load_tokenizer
from nanoseek.train.posttrain.dpo import (DPOConfig, PairSampling, dpo, dpo_loss, dpo_train_config,
                                          frozen_copy, make_loss, sample_pairs, sequence_logps)
from nanoseek.train.posttrain.lora import LoraSettings, add_lora
from nanoseek.train.targets import StepTargets
from tests.posttrain_utils import PAIRS, make_init, write_jsonl
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return make_init(tmp_path_factory.mktemp("init"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": p, "chosen": r, "rejected": PAIRS[(i + 1) % len(PAIRS)][1]}
            for i, (p, r) in enumerate(PAIRS)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def test_dpo_loss_equals_the_hand_computed_value():
    # log π(c)=-3, log π_ref(c)=-4, log π(r)=-5, log π_ref(r)=-4.5, β=0.1:
    # margin = 0.1·((-3+4) - (-5+4.5)) = 0.15;  loss = -log σ(0.15) = log(1 + e^-0.15)
    losses, cr, rr = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                              torch.tensor([-4.5]), beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.05)


def test_sequence_logps_sum_the_completion_tokens_only():
    torch.manual_seed(0)
    model = CausalLM(micro_config()).eval()
    x = torch.randint(3, 384, (1, 8))
    y = torch.full((1, 8), -100)
    y[0, 5:] = x[0, 3:6]
    with torch.no_grad():
        logp = torch.log_softmax(model(x).float(), -1)[0]
        want = sum(logp[i, int(y[0, i])] for i in range(5, 8))
        assert sequence_logps(model, x, y).item() == pytest.approx(want.item(), abs=1e-5)


def test_padding_columns_are_not_counted():
    """Right-padded rows: the MoE counts each row up to its last label only."""
    torch.manual_seed(0)
    model = CausalLM(micro_config()).train()
    x = torch.randint(3, 384, (2, 11))
    y = torch.full((2, 11), -100)
    y[0, 4:7], y[1, 2:10] = x[0, 5:8], x[1, 3:11]  # rows of 7 and 10 tokens, then padding
    model.update_router_biases(gamma=0.0)  # resets the load counters
    sequence_logps(model, x, y)
    assert model.expert_load()[0].sum() == (7 + 10) * model.config.num_experts_per_tok


def test_the_reference_gets_no_gradient(init, pairs_file):
    from nanoseek import from_pretrained
    policy = from_pretrained(init).train()
    reference = frozen_copy(policy)
    batch = encode_pairs(read_pairs(pairs_file), load_tokenizer(init), 64)
    loss, logs = make_loss(reference, 0.1)(policy, batch, StepTargets(torch.tensor(len(batch)), 1))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: margin 0
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(not p.requires_grad for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    # LoRA: the reference is the same network with the adapters off; only adapters learn
    lora = add_lora(from_pretrained(init).train(), LoraSettings(r=4))
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    loss, _ = make_loss(None, 0.1)(lora, batch, StepTargets(torch.tensor(len(batch)), 1))
    assert abs(loss.item() - math.log(2)) > 1e-4  # adapters on vs off differ
    loss.backward()
    grads = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_a_dpo_run_raises_preference_accuracy(tmp_path, init, pairs_file):
    cfg = DPOConfig(init=str(init), data=[str(pairs_file)], beta=0.5,
                    train=dpo_train_config(max_steps=25, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=2))
    run = dpo(tmp_path, cfg, **QUIET)
    before, after = run["before"], run["after"]
    assert before["reward_accuracy"] == 0 and before["reward_margin"] == 0  # policy == reference
    assert after["policy_accuracy"] > before["policy_accuracy"] and after["policy_accuracy"] == 1.0
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0
    assert after["dpo_loss"] < before["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    rec = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= set(rec[-1])
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()


@dataclass
class Reward:
    total: float
    components: dict
    correct: bool


@dataclass
class Example:
    prompt: str
    answer: str
    response: str = ""
    meta: dict = None


class StandInTask:
    """The task API the post-training stages call (nanoseek.data.tasks provides the real ones):
    a completion is correct when it contains the letter 'e'."""

    def examples(self, split, n, seed):
        return [Example(p, "e") for p, _ in PAIRS][:n]

    def prompt_messages(self, ex):
        return [{"role": "user", "content": ex.prompt}]

    def reward(self, ex, completion):
        ok = ex.answer in completion
        return Reward(float(ok), {"accuracy": float(ok)}, ok)


def test_pairs_from_sampling_pair_a_correct_with_an_incorrect_completion(init):
    task = StandInTask()
    pairs = sample_pairs(str(init), task, PairSampling(prompts=4, samples=6, temperature=1.0, max_tokens=12),
                         seed=0, log=lambda *a: None)
    assert pairs, "a random model's samples should sometimes contain an 'e' and sometimes not"
    for p in pairs:
        assert "e" in p["chosen"] and "e" not in p["rejected"]
        assert p["messages"][-1]["role"] == "user"


def test_dpo_cli_errors(tmp_path, init):
    r = CliRunner().invoke(app, ["dpo", "--init", str(init), "--out", str(tmp_path / "r"), "--task", "x"])
    assert r.exit_code == 2 and "--pairs-from-sampling" in r.output
    r = CliRunner().invoke(app, ["dpo", "--init", str(tmp_path), "--out", str(tmp_path / "r"),
                                 "--data", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "no tokenizer.json" in r.output
