"""The engine's linear-weight layout on a CPU (engine/weight_layout.py): the same numbers in
other strides, chosen by timing, and nothing else about the model changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nanoseek.engine import LLM, SamplingParams
from nanoseek.engine import weight_layout as wl
from nanoseek.engine.engine import EngineConfig
from nanoseek.model import CausalLM
from nanoseek.model.v4.attention import GroupedLinear
from tests.test_engine import prompts, reference_greedy, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_k_major_keeps_every_value_and_the_engine_still_decodes_the_reference():
    model = tiny_model(mtp=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ps = prompts(4, seed=3)
    want = [reference_greedy(model, p, 8) for p in ps]
    llm = LLM(model, weight_layout="k-major")
    assert llm.engine.weight_layout == "k-major"
    linears = wl.plain_linears(model)
    assert linears and all(wl.is_k_major(m.weight) for m in linears)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    got = llm.generate([{"prompt_token_ids": p} for p in ps], SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want


def test_a_k_major_model_trains_and_saves_as_a_row_major_one(tmp_path):
    """An engine given a model object (GRPO's rollouts) may relayout it; training it afterwards
    (forward, backward, an optimiser step) and saving it give what the row-major model gives.
    SGD with momentum: Adam's m / sqrt(v) turns the last-bit differences of a near-zero
    gradient (another GEMM kernel sums in another order) into whole steps of lr."""
    a, b = tiny_model(mtp=0, seed=1), tiny_model(mtp=0, seed=1)
    assert wl.apply_weight_layout(b, "k-major") == "k-major"
    x = torch.randint(0, 256, (2, 12))
    for model in (a, b):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            loss = model(x).logsumexp(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    b.save_pretrained(tmp_path / "b")
    c = CausalLM.from_pretrained(tmp_path / "b")
    for (name, pb), pc in zip(b.named_parameters(), c.parameters()):
        assert torch.equal(pb, pc), name


def test_auto_keeps_k_major_only_where_it_times_faster(monkeypatch):
    timings = {"now": (1.0, 0.95)}
    monkeypatch.setattr(wl, "time_layouts", lambda shapes, dtype: timings["now"])
    monkeypatch.setattr(wl, "_chosen", {})
    model = tiny_model(mtp=0)
    assert wl.apply_weight_layout(model, "auto") == "as-loaded"  # 5 % faster: not worth it
    assert not any(wl.is_k_major(m.weight) for m in wl.plain_linears(model))
    monkeypatch.setattr(wl, "_chosen", {})
    timings["now"] = (1.0, 0.5)
    assert wl.apply_weight_layout(model, "auto") == "k-major"
    assert all(wl.is_k_major(m.weight) for m in wl.plain_linears(model))


def test_timing_measures_both_layouts_on_the_models_shapes():
    loaded, kmajor = wl.time_layouts({(64, 32): 2, (8, 16): 1}, torch.float32)
    assert loaded > 0 and kmajor > 0


def test_only_plain_unshared_linears_change():
    """FP8/LoRA/NF4 wrappers and subclasses (V4's GroupedLinear) read their weights their own
    way; a weight tied to an embedding is read by rows."""
    emb = nn.Embedding(10, 8)
    tied = nn.Linear(8, 10, bias=False)
    tied.weight = emb.weight
    model = nn.ModuleDict(dict(emb=emb, tied=tied, grouped=GroupedLinear(4, 8, 2), plain=nn.Linear(8, 4)))
    assert wl.plain_linears(model) == [model["plain"]]
    wl.apply_weight_layout(model, "k-major")
    assert emb.weight.is_contiguous() and model["grouped"].weight.is_contiguous()
    assert wl.is_k_major(model["plain"].weight)


def test_a_bad_layout_names_the_choices():
    with pytest.raises(ValueError, match="weight_layout='fast'.*auto.*k-major.*as-loaded"):
        EngineConfig(weight_layout="fast")
    with pytest.raises(ValueError, match="weight_layout='fast'"):
        wl.apply_weight_layout(tiny_model(mtp=0), "fast")


def test_the_benchmark_prints_both_layouts_and_the_choice():
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/bench_weight_layout.py", "--shapes", "32x16", "--rows", "1", "4",
                        "--prefill-rows", "32", "--repeats", "3"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 + 3 + 1  # header, three row counts, the summary
    assert lines[-1].startswith("decode_ratio=") and "prefill_ratio=" in lines[-1]
    assert lines[-1].split("auto=")[1] in ("k-major", "as-loaded")
