"""`--optimizer muon` (train/numerics/optim.py): which parameters Muon updates, its step
against torch.optim.Muon and against the V4 report's Algorithm 1, exact resume, bad values,
the flag on every training command, and 2 processes (FSDP, EP, TP) against 1."""

import math

import pytest
import torch
from torch import nn

from nanoseek.config import preset
from nanoseek.model import CausalLM
from nanoseek.train.config import TrainConfig
from nanoseek.train.numerics.optim import (HYBRID_NS, HybridMuon, MuonAdamW, build_optimizer,
                                           hybrid_newton_schulz)
from tests.parallel_utils import global_batches, loss_fn, run_ranks
from tests.test_cli import assert_user_error, invoke
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")

KELLER = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's default coefficients


def _owner(report: dict, pattern: str) -> str:
    return next(kind for kind in ("muon", "adamw") if pattern in report.get(kind, {}).get("names", {}))


# ----------------------------------------------------------------- who updates what
def test_v4_ownership_follows_the_report():
    """V4 report §2.4: embedding, prediction head, RMSNorm weights and mHC static biases /
    gates on AdamW; every other matrix (attention, experts, router, mHC's dynamic map,
    compressor, indexer, MTP projections) on Muon."""
    small = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=16, qk_rope_head_dim=8,
                 q_lora_rank=24, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16,
                 index_topk=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
    model = CausalLM(preset("tiny-v4", **small))
    _, report = build_optimizer(model, TrainConfig(optimizer="muon"))
    adamw = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             "model.layers.*.input_layernorm.weight", "model.layers.*.self_attn.sinks",
             "model.layers.*.attn_hc.base", "model.layers.*.attn_hc.scale", "model.hc_head.hc_base",
             "model.layers.*.self_attn.compressor.position_bias", "mtp.*.enorm.weight"]
    muon = ["model.layers.*.self_attn.q_a_proj.weight", "model.layers.*.self_attn.o_b_proj.weight",
            "model.layers.*.mlp.experts.*.gate_proj.weight", "model.layers.*.mlp.shared_experts.down_proj.weight",
            "model.layers.*.mlp.gate.weight", "model.layers.*.attn_hc.fn", "model.hc_head.hc_fn",
            "model.layers.*.self_attn.compressor.kv_proj.weight",
            "model.layers.*.self_attn.compressor.indexer.q_b_proj.weight", "mtp.*.e_proj.weight"]
    assert [_owner(report, n) for n in adamw] == ["adamw"] * len(adamw)
    assert [_owner(report, n) for n in muon] == ["muon"] * len(muon)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert report["muon"]["tensors"] + report["adamw"]["tensors"] == len(trainable)
    assert report["muon"]["parameters"] + report["adamw"]["parameters"] == sum(p.numel() for p in trainable)


def test_v3_groups_weight_decay_and_adamw_is_unchanged():
    model = CausalLM(micro_config())
    opt, report = build_optimizer(model, TrainConfig(optimizer="muon", weight_decay=0.3))
    assert isinstance(opt, MuonAdamW) and _owner(report, "mtp.*.eh_proj.weight") == "muon"
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:  # the router is on Muon, never decayed; the head decays on AdamW
        for p in g["params"]:
            n = names[id(p)]
            if n.endswith("mlp.gate.weight"):
                assert (g["optimizer"], g["weight_decay"]) == ("muon", 0.0)
            elif n == "lm_head.weight" or n.endswith("q_a_proj.weight"):
                assert g["weight_decay"] == 0.3 and g["optimizer"] == ("adamw" if n == "lm_head.weight" else "muon")
    plain, report = build_optimizer(model, TrainConfig())
    assert type(plain) is torch.optim.AdamW and set(report) == {"optimizer", "adamw"}


def test_fused_3d_parameter_is_refused():
    model = nn.Module()
    model.experts = nn.Parameter(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="3-D parameter"):
        build_optimizer(model, TrainConfig(optimizer="muon"))


# ----------------------------------------------------------------- the step's arithmetic
def _toy(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _steps(opt, params, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("shapes", [[(6, 10), (12, 5)], [(8, 16), (16, 8), (8, 16)]],
                         ids=["one_by_one", "stacked"])
def test_one_keller_phase_and_rms_0_2_is_torch_muon(shapes):
    """With torch's coefficients for 5 steps and Moonlight's 0.2, HybridMuon is
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw"): bit for bit matrix by matrix, to
    bf16 rounding when same-shape matrices run as one stack."""
    ours, theirs = _toy(shapes), _toy(shapes)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95)
    _steps(HybridMuon(ours, update_rms=0.2, ns_schedule=((KELLER, 5),), **kw), ours)
    _steps(torch.optim.Muon(theirs, nesterov=True, adjust_lr_fn="match_rms_adamw", **kw), theirs)
    for a, b in zip(ours, theirs):
        if len(set(shapes)) == len(shapes):
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0.02 * 0.2 * 4 * 3 * 2 ** -7)


def _reference_ns(m: torch.Tensor) -> torch.Tensor:
    """Eq. 28 in float64, the report's 8 + 2 hybrid iterations."""
    x = m.double() / m.double().norm()
    for (a, b, c), steps in HYBRID_NS:
        for _ in range(steps):
            g = x @ x.T
            x = a * x + b * g @ x + c * g @ g @ x
    return x


def test_step_is_the_reports_algorithm_1():
    """V4 report Algorithm 1 in float64 (momentum as a sum M = μM + G, Nesterov μM + G,
    O = NS·sqrt(max(n, m))·0.18, W(1 - ηλ) - ηO) against HybridMuon (bf16 iterations, EMA
    momentum): the same weights to bf16 precision of the updates."""
    shapes, lr, wd, mu = [(24, 40), (40, 24)], 0.01, 0.1, 0.95
    ours = _toy(shapes)
    _steps(HybridMuon(ours, lr=lr, weight_decay=wd, momentum=mu), ours)
    ref = [p.detach().double() for p in _toy(shapes)]
    bufs = [torch.zeros_like(w) for w in ref]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(w.shape, generator=g).double() for w in ref]
        for i, (w, grad) in enumerate(zip(ref, grads)):
            bufs[i] = mu * bufs[i] + grad
            o = _reference_ns(mu * bufs[i] + grad) * math.sqrt(max(w.shape)) * 0.18
            ref[i] = w * (1 - lr * wd) - lr * o
    for a, b in zip(ours, ref):
        assert float((a.detach().double() - b).abs().max()) < lr * 0.18 * math.sqrt(40) * 3 * 0.01


def test_hybrid_iterations_settle_the_singular_values_at_one():
    """The last two (2, -1.5, 0.5) steps: every singular value near 1, where five Keller
    steps (torch's default) leave them spread over roughly (0.7, 1.2)."""
    m = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(0, -2, 32))
    hybrid = torch.linalg.svdvals(hybrid_newton_schulz(m).double())
    keller = torch.linalg.svdvals(hybrid_newton_schulz(m, ((KELLER, 5),)).double())
    assert float((hybrid - 1).abs().max()) < 0.05
    assert float((keller - 1).abs().max()) > 0.15


# ----------------------------------------------------------------- in the Trainer
def _trainer(out_dir, steps=4, optimizer="muon", **kw):
    from nanoseek.train.loop import Trainer
    torch.manual_seed(0)
    model = CausalLM(micro_config())
    data = global_batches(model.config.vocab_size)
    tc = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0,
                     save_every=0, optimizer=optimizer, **kw)
    return Trainer(model, tc, out_dir, data, loss_fn, count_targets=lambda b: model.loss_targets(b[1]),
                   progress=False)


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Both optimizers' state (Muon's momentum, AdamW's moments and step) survives
    train_state.pt: 2 steps, a checkpoint, 2 more in a new Trainer == 4 steps straight."""
    from nanoseek.train.run.metrics import read_metrics
    ref = _trainer(tmp_path / "ref")
    ref.fit()
    first = _trainer(tmp_path / "run")
    first.fit(until=2)
    again = _trainer(tmp_path / "run")
    assert again.resume() and again.step == 2
    again.fit()
    for (name, a), b in zip(ref.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    kinds = [r["kind"] for r in read_metrics(tmp_path / "run")]
    assert kinds.count("optimizer") == 1 and kinds.count("train") == 4
    record = next(r for r in read_metrics(tmp_path / "run") if r["kind"] == "optimizer")
    assert record["optimizer"] == "muon" and record["muon"]["tensors"] > 0 < record["adamw"]["tensors"]


def test_adamw_checkpoint_does_not_load_into_muon(tmp_path):
    run = _trainer(tmp_path, optimizer="adamw")
    run.fit(until=1)
    with pytest.raises((ValueError, KeyError), match="optimizer|group"):
        _trainer(tmp_path).resume()


# ----------------------------------------------------------------- bad values, the CLI
def test_bad_optimizer_is_one_clear_error():
    with pytest.raises(ValueError, match=r"training option 'optimizer': must be one of adamw \| muon, got 'sgd'"):
        TrainConfig(optimizer="sgd").validate()
    assert_user_error(invoke("pretrain", "--out", "x", "--optimizer", "sgd"), "--optimizer", "sgd",
                      "adamw | muon")


TRAINING = [["pretrain", "--out", "x"], ["sft", "--model", "x", "--out", "y"],
            ["dpo", "--model", "x", "--out", "y"], ["grpo", "--model", "x", "--out", "y"], ["speedrun"]]


@pytest.mark.parametrize("command", TRAINING, ids=lambda c: c[0])
def test_every_training_command_takes_optimizer(command):
    assert "--optimizer" in invoke(command[0], "--help", terminal_width=200).output
    assert_user_error(invoke(*command, "--optimizer", "adam"), "--optimizer", "adamw | muon")


@pytest.mark.parametrize("command, module, name", [
    (["sft", "--model", "x", "--out", "y", "--task", "arithmetic"], "nanoseek.train.posttrain.sft", "sft"),
    (["dpo", "--model", "x", "--out", "y"], "nanoseek.train.posttrain.dpo", "dpo"),
    (["grpo", "--model", "x", "--out", "y"], "nanoseek.train.rl.run", "rl"),
    (["pretrain", "--out", "y"], "nanoseek.train.pretrain", "pretrain"),
    (["speedrun"], "nanoseek.recipes.speedrun", "speedrun"),
], ids=["sft", "dpo", "grpo", "pretrain", "speedrun"])
def test_the_flag_reaches_the_training_config(monkeypatch, command, module, name):
    import importlib

    def stand_in(*args, **kw):
        raise RuntimeError(args, kw)
    monkeypatch.setattr(importlib.import_module(module), name, stand_in)
    args, kw = invoke(*command, "--optimizer", "muon").exception.args
    if name == "speedrun":
        assert kw["optimizer"] == "muon"
    else:
        assert next(a for a in args if hasattr(a, "train")).train.optimizer == "muon"


# ----------------------------------------------------------------- 2 processes against 1
def _whole(t):
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _replay_case(rank, parallel_kw, out_dir=None, steps=2):
    """`steps` Muon steps of the micro model on 2 ranks; records, whole, the weights before,
    each step's gradients as the optimizer saw them (reduced, clipped) and its lr, and the
    weights after each step."""
    from nanoseek.parallel import ParallelConfig
    from nanoseek.parallel.runtime import Parallel
    from nanoseek.train.loop import Trainer
    torch.manual_seed(0)
    model = CausalLM(micro_config())
    par = Parallel(model, ParallelConfig(**parallel_kw), torch.device("cpu"))
    data = global_batches(model.config.vocab_size)
    tc = TrainConfig(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0,
                     save_every=0, optimizer="muon")
    tr = Trainer(model, tc, out_dir or "unused", lambda s, m: par.local_rows(data(s, m)), loss_fn,
                 count_targets=lambda b: model.loss_targets(b[1]), progress=False, parallel=par)
    weights = lambda: {n: _whole(p) for n, p in model.named_parameters()}  # noqa: E731
    rec = {"before": weights(), "grads": [], "lrs": [], "after": []}
    step = tr.optimizer.step

    def spy(*a, **k):
        rec["grads"].append({n: _whole(p.grad) for n, p in model.named_parameters() if p.grad is not None})
        rec["lrs"].append(tr.optimizer.param_groups[0]["lr"])
        out = step(*a, **k)
        rec["after"].append(weights())
        return out
    tr.optimizer.step = spy
    for _ in range(steps):
        tr.train_step()
    if out_dir is not None:  # a DCP checkpoint, and Muon's state as this rank holds it
        tr.save()
        names = {id(p): n for n, p in model.named_parameters()}
        rec["state"] = {names[id(p)]: {k: _whole(v) for k, v in tr.optimizer.state[p].items()}
                        for g in tr.optimizer.param_groups for p in g["params"] if tr.optimizer.state[p]}
    return rec


def _layouts(rank, out_dir):
    return {"fsdp": _replay_case(rank, {"ep": 1}), "ep": _replay_case(rank, {"ep": 2}, out_dir),
            "tp": _replay_case(rank, {"tp": 2})}


def _merged(ranks: list[dict]) -> dict:
    """The ranks' records as one: under EP each rank holds (and records) its own experts."""
    out = {"before": {n: t for r in ranks for n, t in r["before"].items()}, "lrs": ranks[0]["lrs"]}
    for key in ("grads", "after"):
        out[key] = [{n: t for r in ranks for n, t in r[key][i].items()} for i in range(len(out["lrs"]))]
    if "state" in ranks[0]:
        out["state"] = {n: v for r in ranks for n, v in r["state"].items()}
    return out


@pytest.mark.slow  # one spawn of 2 gloo processes, three layouts (~20 s on 2 busy cores)
def test_two_processes_take_the_one_process_step(tmp_path):
    """FSDP2 (dense weights DTensor-sharded: each update gathered whole, orthogonalised,
    re-sharded), EP (each rank its experts) and TP: fed the same gradients, one process's
    Muon + AdamW gives bit for bit the weights the 2 ranks reached, step after step
    (momentum and Adam moments sharded). The same gradients: the ranks' reductions differ from one
    process's in the last bits, and Muon's bf16 iterations amplify such differences in a
    low-rank gradient (an expert that saw one token) into different directions, so whole
    runs are compared by their losses (test_parallel.py), the optimizer here."""
    ranks = run_ranks(_layouts, 2, tmp_path / "ranks", tmp_path, timeout=300)
    for layout in ("fsdp", "ep", "tp"):
        rec = _merged([r[layout] for r in ranks])
        model = CausalLM(micro_config())
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(rec["before"][n])
        opt, _ = build_optimizer(model, TrainConfig(lr=1e-2, optimizer="muon"))
        for grads, lr, after in zip(rec["grads"], rec["lrs"], rec["after"]):
            for n, p in params.items():
                p.grad = grads.get(n)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            assert set(after) == set(params), layout
            for n, p in params.items():
                torch.testing.assert_close(p.detach(), after[n], rtol=0, atol=0,
                                           msg=lambda m: f"{layout} {n}: {m}")
    # the DCP checkpoint the 2 EP ranks saved resumes on one process with their Muon state
    from nanoseek.train.loop import Trainer
    saved = _merged([r["ep"] for r in ranks])["state"]
    model = CausalLM(micro_config())
    one = Trainer(model, TrainConfig(max_steps=4, batch_size=4, optimizer="muon"), tmp_path, None,
                  loss_fn, progress=False)
    assert one.resume() and one.sharded and one.step == 2
    names = {id(p): n for n, p in model.named_parameters()}
    loaded = {names[id(p)]: one.optimizer.state[p] for g in one.optimizer.param_groups for p in g["params"]}
    assert set(loaded) == set(saved)
    assert any("momentum_buffer" in v for v in saved.values()) and any("exp_avg" in v for v in saved.values())
    for n, state in saved.items():
        for k, v in state.items():
            assert torch.equal(loaded[n][k], v), (n, k)
