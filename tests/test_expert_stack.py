"""The routed experts stacked for grouped GEMMs (model/expert_stack.py): the same outputs as
the loop, the same parameters and state dict, and the loop whenever the stack no longer
describes the experts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nanoseek.model import CausalLM
from nanoseek.model.expert_stack import ExpertStack, stack_experts, stackable
from nanoseek.model.moe import MoE
from tests.conftest import randomize, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def moe_layer(**overrides) -> MoE:
    return randomize(CausalLM(tiny_config(**overrides))).model.layers[1].mlp


@pytest.fixture
def grouped(monkeypatch) -> list[int]:
    """The row counts of every call of the stack's grouped path."""
    calls: list[int] = []
    run = ExpertStack.__call__

    def counting(self, x, counts):
        calls.append(x.shape[0])
        return run(self, x, counts)
    monkeypatch.setattr(ExpertStack, "__call__", counting)
    return calls


def loop_output(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    stack, moe.expert_stack = moe.expert_stack, None
    try:
        with torch.no_grad():
            return moe(x)
    finally:
        moe.expert_stack = stack


@pytest.mark.parametrize("overrides, limit", [({}, 0.0), ({}, 0.5),
                                              ({"num_experts_per_tok": 3, "n_group": 1, "topk_group": 1}, 0.0)])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_experts_give_the_loops_outputs(overrides, limit, tokens, grouped):
    """limit: V4's SwiGLU clamp (set on the experts: a V3 config has no such field)."""
    moe = moe_layer(**overrides)
    for expert in moe.experts:
        expert.swiglu_limit = limit
    x = torch.randn(2, tokens, moe.cfg.hidden_size)
    with torch.no_grad():
        want = moe(x)
    assert stack_experts(moe) == 1
    with torch.no_grad():
        got = moe(x)
    assert grouped == [2 * tokens * moe.top_k]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loop_output(moe, x), want, atol=1e-6, rtol=1e-6)


def test_bf16_experts_are_stacked_with_their_padded_slices(grouped):
    """On a CPU in bf16 the slices are padded to a few lengths (moe.padded_rows); the padding
    rows read a zero token and are dropped."""
    moe = moe_layer(hidden_size=64, moe_intermediate_size=32).to(torch.bfloat16)
    x = torch.randn(1, 9, 64, dtype=torch.bfloat16)
    want = loop_output(moe, x)
    assert stack_experts(moe) == 1
    with torch.no_grad():
        got = moe(x)
    assert len(grouped) == 1 and grouped[0] >= 9 * moe.top_k
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_stacking_keeps_parameters_values_and_state_dict_and_adds_no_copy():
    moe = moe_layer()
    params = {n: p for n, p in moe.named_parameters()}
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    stack_experts(moe)
    assert {n: p for n, p in moe.named_parameters()} == params  # the same Parameter objects
    after = moe.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    stack = moe.expert_stack
    storages = {stack.w13.untyped_storage().data_ptr(), stack.w2.untyped_storage().data_ptr()}
    for expert in moe.experts:
        for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
            assert proj.weight.untyped_storage().data_ptr() in storages


def test_an_in_place_update_of_an_expert_reaches_the_grouped_path():
    moe = moe_layer()
    stack_experts(moe)
    x = torch.randn(1, 12, moe.cfg.hidden_size)
    with torch.no_grad():
        for p in moe.experts.parameters():
            p.mul_(1.5)  # what an optimiser step does
        got = moe(x)
    torch.testing.assert_close(got, loop_output(moe, x), atol=1e-6, rtol=1e-6)


def test_training_keeps_the_loop_and_its_gradients(grouped):
    """With autograd the loop runs: through the stack the gradients would reach W_13 / W_2,
    not the experts' parameters."""
    moe = moe_layer()
    stack_experts(moe)
    x = torch.randn(2, 6, moe.cfg.hidden_size)
    moe(x).sum().backward()
    assert grouped == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.experts.parameters())


class Scaled(nn.Module):
    """A wrapper standing in for LoRA / NF4: the loop must call it."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


@pytest.mark.parametrize("change", ["wrap a linear", "replace a parameter", "reassign data", "move dtype",
                                    "replace an expert", "forward hook", "global hook"])
def test_the_loop_runs_once_the_stack_no_longer_describes_the_experts(change, grouped):
    moe = moe_layer()
    stack_experts(moe)
    x = torch.randn(1, 7, moe.cfg.hidden_size)
    expert = moe.experts[3]
    handle = None
    with torch.no_grad():
        if change == "wrap a linear":
            expert.up_proj = Scaled(expert.up_proj)
        elif change == "replace a parameter":
            expert.down_proj.weight = nn.Parameter(expert.down_proj.weight.detach().clone() * 3)
        elif change == "reassign data":
            expert.gate_proj.weight.data = expert.gate_proj.weight.data.clone() * 3
        elif change == "move dtype":
            moe.double()
            x = x.double()
        elif change == "replace an expert":
            moe.experts[3] = copy.deepcopy(expert)
            for p in moe.experts[3].parameters():
                p.mul_(3)
        elif change == "forward hook":
            handle = expert.register_forward_hook(lambda m, i, o: o * 3)
        else:
            handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            got = moe(x)
            assert grouped == []
            want = torch.zeros_like(x.view(-1, x.shape[-1]))
            weights, indices, _, _ = moe.gate(x.view(-1, x.shape[-1]))
            flat = x.view(-1, x.shape[-1])
            for t in range(flat.shape[0]):
                for w, e in zip(weights[t], indices[t]):
                    want[t] += w * moe.experts[int(e)](flat[t:t + 1])[0]
                want[t] += moe.shared_experts(flat[t:t + 1])[0]
        finally:
            if handle is not None:
                handle.remove()
    torch.testing.assert_close(got, want.view_as(got), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides, why", [
    ({"hidden_size": 30, "num_attention_heads": 2}, "rows of 30 fp32 values: not a multiple of 16 bytes"),
    ({"moe_intermediate_size": 10}, "intermediate rows of 40 bytes"),
])
def test_experts_the_kernel_cannot_take_are_left_to_the_loop(overrides, why):
    moe = moe_layer(**overrides)
    assert not stackable(moe.experts), why
    assert stack_experts(moe) == 0 and moe.expert_stack is None


def test_float64_and_wrapped_experts_are_not_stacked():
    assert not stackable(moe_layer().double().experts)
    moe = moe_layer()
    moe.experts[0].gate_proj = Scaled(moe.experts[0].gate_proj)
    assert not stackable(moe.experts)


def test_the_benchmark_runs_both_variants_and_they_agree():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/bench_expert_stack.py", "--requests", "3", "--max-tokens", "3",
                        "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["grouped", "loop"]
    assert lines[-1].startswith("run_ratio=") and lines[-1].endswith("outputs_equal=True")


def test_a_copied_or_saved_model_holds_no_stack_and_gives_the_same_outputs(tmp_path):
    moe = moe_layer()
    stack_experts(moe)
    x = torch.randn(1, 8, moe.cfg.hidden_size)
    with torch.no_grad():
        want = moe(x)
    torch.save(moe, tmp_path / "moe.pt")
    for other in (copy.deepcopy(moe), torch.load(tmp_path / "moe.pt", weights_only=False)):
        assert other.expert_stack is None
        with torch.no_grad():
            torch.testing.assert_close(other(x), want, atol=1e-6, rtol=1e-6)
    assert moe.expert_stack is not None


def test_the_benchmark_takes_a_text_checkpoint(tmp_path):
    model = randomize(CausalLM(tiny_config(max_position_embeddings=512)))
    model.save_pretrained(tmp_path)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/bench_expert_stack.py", "--checkpoint", str(tmp_path),
                        "--requests", "2", "--repeats", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].endswith("outputs_equal=True")
