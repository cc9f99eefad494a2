import math

import pytest
import torch

from nanoseek.model import CausalLM
from nanoseek.train.loop import TrainConfig, Trainer, max_violation, param_groups, read_metrics
from nanoseek.train.schedule import lr_at
from tests.train_utils import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules():
    assert lr_at(0, 1.0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = lr_at(55, 1.0, 100, warmup_steps=10, min_lr_ratio=0.0)
    assert mid == pytest.approx(0.5)
    wsd = [lr_at(s, 1.0, 100, 10, "wsd", 0.0, decay_frac=0.2) for s in range(101)]
    assert wsd[10:80] == [1.0] * 70 and wsd[90] == pytest.approx(0.5) and wsd[100] == 0.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, schedule="linear")


def _batches(vocab, B=4, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(3, vocab, (64, S + 1), generator=g)
    pool[:, 1::2] = (pool[:, 0::2][:, :pool[:, 1::2].shape[1]] + 1) % vocab  # learnable: odd = even + 1

    def next_batch(step, micro):
        idx = torch.randint(0, 64, (B,), generator=torch.Generator().manual_seed(step * 31 + micro))
        rows = pool[idx]
        return rows[:, :-1], rows[:, 1:]
    return next_batch


def _loss(model, batch):
    out = model.loss(*batch)
    return out.loss, {"lm_loss": out.lm_loss, "mtp_loss": out.mtp_loss, "aux_loss": out.aux_loss}


def _trainer(tmp_path, cfg=None, **kw):
    torch.manual_seed(0)
    model = CausalLM(cfg or micro_config())
    tc = TrainConfig(**{"max_steps": 30, "lr": 1e-2, "warmup_steps": 3, "eval_every": 0,
                        "save_every": 0, **kw})
    return Trainer(model, tc, tmp_path, _batches(model.config.vocab_size, B=tc.batch_size),
                   _loss, progress=False)


def test_loss_falls_and_metrics_are_logged(tmp_path):
    tr = _trainer(tmp_path, batch_size=4)
    bias = [m.gate.e_score_correction_bias.clone() for m in tr.model.moe_layers()]
    summary = tr.fit()
    rec = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in rec] == list(range(1, 31)) and summary["steps"] == 30
    assert rec[-1]["lm_loss"] < rec[0]["lm_loss"] - 1.0
    assert rec[0]["mtp_loss"] is not None and rec[0]["aux_loss"] > 0
    assert len(rec[0]["max_violation"]) == len(tr.model.moe_layers()) == 2  # layer 1 + MTP
    assert rec[-1]["tokens"] == 30 * 4 * 24
    # the aux-loss-free update moved the router biases and reset the load counters
    assert any(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(bias, tr.model.moe_layers()))
    assert all(float(m.tokens_per_expert.sum()) == 0 for m in tr.model.moe_layers())
    assert (tmp_path / "train_state.pt").exists()


def test_grad_accumulation_matches_the_big_batch(tmp_path):
    """2 micro-batches of 2 == 1 batch of 4: same gradients (loads summed over the step)."""
    def grads(accum, B):
        torch.manual_seed(0)
        model = CausalLM(micro_config())
        tc = TrainConfig(max_steps=1, batch_size=B, grad_accum=accum, lr=1e-3, warmup_steps=0,
                         eval_every=0, save_every=0)
        full = _batches(model.config.vocab_size, B=4)

        def next_batch(step, micro):
            x, y = full(step, 0)
            return x[micro * B:(micro + 1) * B], y[micro * B:(micro + 1) * B]
        tr = Trainer(model, tc, tmp_path / f"a{accum}", next_batch, _loss, progress=False)
        seen = {}
        orig = tr.optimizer.step

        def spy(*a, **k):
            seen["g"] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            seen["load"] = [m.tokens_per_expert.clone() for m in model.moe_layers()]
            return orig(*a, **k)
        tr.optimizer.step = spy
        tr.train_step()
        return seen
    a, b = grads(1, 4), grads(2, 2)
    for ga, gb in zip(a["g"], b["g"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    for la, lb in zip(a["load"], b["load"]):
        assert torch.equal(la, lb) and la.sum() > 0


def test_no_weight_decay_on_norms_and_embeddings():
    model = CausalLM(micro_config())
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.model.embed_tokens.weight) in ids and id(model.model.norm.weight) in ids
    assert id(model.lm_head.weight) not in ids and decay["weight_decay"] == 0.1


def test_router_is_not_decayed():
    model = CausalLM(micro_config())
    decay, no_decay = param_groups(model, 0.1)
    ids = {id(p) for p in no_decay["params"]}
    gates = [m.gate.weight for m in model.moe_layers()]
    assert gates and all(id(g) in ids for g in gates)
    assert all(id(p) not in ids for n, p in model.named_parameters() if n.endswith("gate_proj.weight"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_options_train(tmp_path, precision):
    tr = _trainer(tmp_path, max_steps=4, precision=precision)
    tr.fit()
    rec = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(rec) == 4 and all(math.isfinite(r["loss"]) for r in rec)
    assert tr.scaler.is_enabled() == (precision == "fp16")


def test_time_limit_stops_and_decays(tmp_path):
    tr = _trainer(tmp_path, max_steps=10_000, time_limit=1.0)
    tr.elapsed = 0.9  # as if 90 % of the time budget were gone after 0 steps
    s = tr.fit()
    assert s["stopped_early"] and s["steps"] < 10_000
    rec = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert rec[-1]["lr"] < 0.2 * 1e-2  # the schedule followed the clock to its end


def test_time_limit_spent_before_a_resume_trains_no_extra_step(tmp_path):
    tr = _trainer(tmp_path, max_steps=20, time_limit=1.0, save_every=1)
    tr.fit(until=4)
    assert tr.step == 4
    again = _trainer(tmp_path, max_steps=20, time_limit=1.0, save_every=1)
    assert again.resume() and again.step == 4
    again.elapsed = 1.5  # the budget ran out before this process started
    s = again.fit()
    assert s["steps"] == 4 and s["stopped_early"]
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_a_fresh_fit_drops_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    tr = _trainer(tmp_path, max_steps=2)
    tr.fit()  # as if killed after logging 2 steps, before any train_state.pt
    (tmp_path / "train_state.pt").unlink(missing_ok=True)
    again = _trainer(tmp_path, max_steps=4)
    assert not again.resume()
    again.fit()
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_max_violation():
    assert max_violation(torch.tensor([1.0, 1.0, 1.0, 1.0])) == 0
    assert max_violation(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(3.0)


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="'schedule'"):
        _trainer(tmp_path, schedule="linear")
    with pytest.raises(ValueError, match="'batch_size'"):
        _trainer(tmp_path, batch_size=0)


def test_thread_tuner_switches_to_the_faster_count():
    from nanoseek.train.threads import ThreadTuner
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(max_threads=2, every=5)
        used = []
        for step in range(12):
            n = tuner.before_step(step)
            used.append(n)
            tuner.after_step(1.0 if n == 2 else 0.3)  # one thread is 3x faster here
        assert used[:5] == [2] * 5 and used[5] == 1 and used[6:10] == [1] * 4
        assert used[10] == 2 and used[11] == 1  # it re-checks the other count, which lost
        assert tuner.current == 1
        slow = ThreadTuner(max_threads=2, every=5)
        for step in range(12):
            n = slow.before_step(step)
            slow.after_step(1.0 if n == 2 else 1.5)
        assert slow.current == 2  # the trial lost: stay
    finally:
        torch.set_num_threads(before)


def test_router_z_loss_is_optional_and_logged(tmp_path):
    def aux(coef):
        tr = _trainer(tmp_path / str(coef), cfg=micro_config(router_z_loss_coef=coef), max_steps=1)
        return tr.train_step()["aux_loss"]
    assert aux(0.01) > aux(0.0) > 0
